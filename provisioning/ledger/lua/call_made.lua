-- A call a step was admitted for goes out now: the system's rate limit counts it from now, and
-- learns when calls of its number go out.
--
-- admit.lua reserves each of a step's calls for when it expects it to go out (the first at the
-- admission, a later one its lead later); the call is scored again as it really leaves, so that the
-- window holds the calls as the system sees them. A call beyond those the step was admitted for (a
-- lookup before a repeat) is counted as well, from now.
--
-- The lead of a later call (how long after its admission it went out) is learned here: a shorter
-- one is believed at once, a longer one slowly (by ARGV[6] of the difference). A call reserved
-- earlier than it goes is only counted in more windows than it falls in (the limit holds); one
-- reserved later than it goes would be missing from windows it does fall in.
--
-- KEYS[1]  the system's calls in the window (zset: one member per call, scored by when, in ms)
-- KEYS[2]  the system's leads               (hash: call number -> ms after its admission it goes out)
-- ARGV[1]  the call's member: the admission's id, ':', the call's number (from 1)
-- ARGV[2]  the window, in milliseconds
-- ARGV[3]  the call's number (from 1)
-- ARGV[4]  the calls the step was admitted for
-- ARGV[5]  when the step was admitted (Redis's clock, ms)
-- ARGV[6]  how much of a longer lead is believed at once (0 to 1)
-- ARGV[7]  how long the leads are kept without a call, in milliseconds
--
-- Returns the time the call is counted from (Redis's clock, ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
if redis.call('PTTL', KEYS[1]) < window then redis.call('PEXPIRE', KEYS[1], window) end
local number = tonumber(ARGV[3])
if number >= 2 and number <= tonumber(ARGV[4]) then
  local seen = now - tonumber(ARGV[5])
  local lead = tonumber(redis.call('HGET', KEYS[2], number) or '-1')
  if lead < 0 or seen < lead then
    lead = seen
  else
    lead = lead + (seen - lead) * tonumber(ARGV[6])
  end
  redis.call('HSET', KEYS[2], number, string.format('%.1f', lead))
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
return now
