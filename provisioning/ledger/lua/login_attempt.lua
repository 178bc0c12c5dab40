-- A console login attempt (provisioning.ledger.login_throttle): refused while the user or the
-- client address is held; otherwise counted as a failure in advance, before the password is
-- checked, so that attempts running side by side cannot all slip past one hold (a right password
-- takes the count back: login_success.lua).
--
-- KEYS[1]  the user's counter     (hash: failures, last_ms, until_ms)
-- KEYS[2]  the address's counter  (hash: failures, last_ms, until_ms)
-- ARGV[1]  now, in ms since the epoch
-- ARGV[2]  CONSOLE_LOGIN_LOCK_S in ms: how long a lock lasts, and how long a counter outlives
--          its last attempt (then it starts again from 0)
-- ARGV[3]  CONSOLE_LOGIN_FREE_FAILURES: the user's failures answered at once
-- ARGV[4]  CONSOLE_LOGIN_DELAY_S in ms: the wait after the first failure past those, doubled by
--          each further one (never longer than a lock)
-- ARGV[5]  CONSOLE_LOGIN_MAX_FAILURES: the user's failures that lock it
-- ARGV[6]  CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS: the address's failures that lock it (no
--          growing wait before: one address is often many people behind a NAT or a VPN)
--
-- Returns {0, i, until_ms, failures}: KEYS[i] holds the attempt until until_ms (nothing counted);
-- or {1, user failures, user until_ms, address failures, address until_ms}: the attempt is counted,
-- and each until_ms is what holds the next attempt should this one fail.
local now = tonumber(ARGV[1])
local lock = tonumber(ARGV[2])
local free = tonumber(ARGV[3])
local delay = tonumber(ARGV[4])
local max = {tonumber(ARGV[5]), tonumber(ARGV[6])}

for i = 1, 2 do
  local f = redis.call('HMGET', KEYS[i], 'failures', 'last_ms', 'until_ms')
  local last, until_ms = tonumber(f[2]), tonumber(f[3])
  if last and last + lock <= now then
    redis.call('DEL', KEYS[i])
  elseif until_ms and until_ms > now then
    return {0, i, until_ms, tonumber(f[1]) or 0}
  end
end

local out = {1}
for i = 1, 2 do
  local n = redis.call('HINCRBY', KEYS[i], 'failures', 1)
  local wait = 0
  if n >= max[i] then
    wait = lock
  elseif i == 1 and n > free then
    wait = math.min(delay * 2 ^ (n - free - 1), lock)
  end
  local until_ms = math.floor(now + wait)
  redis.call('HSET', KEYS[i], 'last_ms', now, 'until_ms', until_ms)
  redis.call('PEXPIRE', KEYS[i], lock)
  out[#out + 1] = n
  out[#out + 1] = until_ms
end
return out
