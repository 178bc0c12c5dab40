-- A console login with the right password (provisioning.ledger.login_throttle): the user's
-- counter is reset; the address's takes back the failure login_attempt.lua counted in advance
-- (the address keeps its other failures: one user's success says nothing of the others').
--
-- KEYS[1]  the user's counter     (hash: failures, last_ms, until_ms)
-- KEYS[2]  the address's counter  (hash: failures, last_ms, until_ms)
-- ARGV[1]  CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS: below it again, the address is not held
--
-- Returns the address's failures left.
redis.call('DEL', KEYS[1])
local n = tonumber(redis.call('HGET', KEYS[2], 'failures'))
if not n or n <= 0 then
  return 0
end
n = redis.call('HINCRBY', KEYS[2], 'failures', -1)
if n < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[2], 'until_ms', 0)
end
return n
