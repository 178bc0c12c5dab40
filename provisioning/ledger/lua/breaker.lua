-- The outcome of a call to an external system, for its circuit breaker.
--
--   ok         closes the circuit and forgets the failures (a probe's success closes a half-open one)
--   failed     a transient failure: one more in a row; at the threshold, or when a probe fails, the
--              circuit opens for its cool-down (doubled at each opening in a row, up to the cap);
--              failures reported while it is open (calls admitted before it opened) change nothing
--   throttled  the system refused us for our rate (429, REQUEST_LIMIT_EXCEEDED): open at once
-- A Retry-After the system gave sets the cool-down (up to the cap) whatever the count.
--
-- KEYS[1]  the system's breaker  (hash: state, failures, opens, open_until_ms)
-- KEYS[2]  the system's probe    (string, with expiry)
-- (The time is Redis's own: the same for every worker on every host.)
-- ARGV[1]  ok | failed | throttled
-- ARGV[2]  failures in a row that open the circuit
-- ARGV[3]  the cool-down, in milliseconds
-- ARGV[4]  the longest cool-down, in milliseconds
-- ARGV[5]  the system's Retry-After, in milliseconds (0: none)
--
-- Returns the circuit's state after it: closed, open or half_open.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[1] == 'ok' then
  if state ~= 'closed' or redis.call('HGET', KEYS[1], 'failures') then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'opens', 0)
    redis.call('DEL', KEYS[2])
  end
  return 'closed'
end
-- Already open: the steps that were admitted before it opened are failing too; that changes nothing.
if state == 'open' then return 'open' end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local retry_after = tonumber(ARGV[5])
if state == 'half_open' or failures >= tonumber(ARGV[2]) or ARGV[1] == 'throttled' or retry_after > 0 then
  local opens = redis.call('HINCRBY', KEYS[1], 'opens', 1)
  local cooldown = math.min(tonumber(ARGV[3]) * 2 ^ (opens - 1), tonumber(ARGV[4]))
  if retry_after > 0 then cooldown = math.min(retry_after, tonumber(ARGV[4])) end
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until_ms', now + cooldown)
  redis.call('DEL', KEYS[2])
  return 'open'
end
return state
