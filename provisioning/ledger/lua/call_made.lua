-- A call a step was admitted for goes out now: the system's rate limit counts it from now.
--
-- A step's calls are admitted together (admit.lua: one member per call, scored by the admission) but
-- go out one after the other, the next a latency later: each is scored again as it really leaves,
-- so that the window holds the calls as the system sees them. A call beyond those the step was
-- admitted for (a lookup before a repeat) is counted as well, from now.
--
-- KEYS[1]  the system's calls in the window (zset: one member per call, scored by when, in ms)
-- ARGV[1]  the call's member: the admission's id, ':', the call's number (from 1)
-- ARGV[2]  the window, in milliseconds (the key's expiry)
--
-- Returns the time the call is counted from (Redis's clock, ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return now
