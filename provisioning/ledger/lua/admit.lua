-- May a step call its external system now? The system's circuit breaker, then its rate limit, in one
-- round trip; no call is taken when the answer is no.
--
-- The rate limit is a sliding window: at most LIMIT calls in any WINDOW, however the window is
-- placed (a token whose call was made comes back exactly one window later). A plain token bucket
-- would let a full bucket burst on top of its refill: twice the limit within one window.
--
-- A step's calls go out one after the other, each a latency after the one before. Each is reserved
-- in the window for when it will go out: the first now, a later one its LEAD later (how long after
-- their admission the system's steps' calls of that number have gone out, learned by
-- call_made.lua, which also scores each call again when it really leaves). A step is admitted when
-- every window that would hold one of its calls keeps within the limit. Reserving a second call now
-- would hold its token for a latency in which nobody calls, on every step: a tenth of a limit
-- whose steps make two calls 100 ms apart.
--
-- A step turned away by the limit is given a slot: a time to come back, after the slots already
-- given out, spaced by INTERVAL (its calls at the limit's pace). The slots queue the steps in the
-- order they were turned away and spread their returns evenly, so the limit is used as fully as it
-- allows and nobody comes back to a full window at once. The slot is the step's (its HOLDER) until
-- it comes back: a step back too early is told to wait for its slot again (a countdown cut short by
-- the broker), and a step back on time does not queue behind the steps turned away since. While
-- slots are given out ahead, a step new to the queue does not take a free call before them: it
-- gets the next slot. Whoever is back, the window decides: a slot is when to ask, not a call.
--
-- KEYS[1]  the system's breaker           (hash: state closed|open|half_open, failures, opens,
--                                          open_until_ms)
-- KEYS[2]  the system's probe             (string, with expiry: who may probe a half-open circuit)
-- KEYS[3]  the system's calls in the window (zset: one member per call, scored by when, in ms)
-- KEYS[4]  the system's slots              (zset: HOLDER -> its slot, in ms; member '' holds the
--                                          last slot given out, the queue's tail)
-- KEYS[5]  the run metrics' counters      (hash: a refusal counts one in ARGV[6] or ARGV[7])
-- KEYS[6]  the system's leads             (hash: call number -> ms after its admission a call of
--                                          that number goes out; written by call_made.lua)
-- (The time is Redis's own: the same for every worker on every host.)
-- ARGV[1]  the limit: calls per window (0: no rate limit)
-- ARGV[2]  the window, in milliseconds
-- ARGV[3]  the calls the step will make (tokens it takes)
-- ARGV[4]  a unique id of this admission (members of KEYS[3] are ID:1, ID:2, ...)
-- ARGV[5]  how long a probe may take before another step may probe, in milliseconds
-- ARGV[6]  the counter of steps the breaker turned away
-- ARGV[7]  the counter of steps the rate limit turned away
-- ARGV[8]  who asks (a run's step), to hold a slot; '' for nobody: no slot, only the window's answer
-- ARGV[9]  how long a slot is kept for a step that does not come back, in milliseconds
--
-- Returns one of:
--   {1, clean, probe, at}              go (clean 1: the circuit is closed with no failure counted,
--                                      so a success needs no write; probe 1: this step is the
--                                      half-open circuit's one probe; at: the admission's time, ms)
--   {0, wait_ms, 'breaker_open', 0}    the circuit is open, or another step is probing it
--   {0, wait_ms, 'rate_limited', 0}    come back in wait_ms: the step's slot, or the window's next
--                                      free call
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local clean = 1
if state ~= 'closed' or tonumber(redis.call('HGET', KEYS[1], 'failures') or '0') > 0 then clean = 0 end
if state == 'open' then
  local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until_ms') or '0')
  if now < open_until then
    redis.call('HINCRBY', KEYS[5], ARGV[6], 1)
    return {0, open_until - now, 'breaker_open', 0}
  end
  redis.call('HSET', KEYS[1], 'state', 'half_open')
  state = 'half_open'
end
if state == 'half_open' then
  -- One probe at a time: the others wait for its outcome.
  if not redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) then
    redis.call('HINCRBY', KEYS[5], ARGV[6], 1)
    return {0, redis.call('PTTL', KEYS[2]), 'breaker_open', 0}
  end
end
local limit = tonumber(ARGV[1])
if limit > 0 then
  local window = tonumber(ARGV[2])
  local calls = tonumber(ARGV[3])
  local holder = ARGV[8]
  local keep = tonumber(ARGV[9])
  local interval = calls * window / limit

  local function refuse(wait)
    if state == 'half_open' then redis.call('DEL', KEYS[2]) end
    redis.call('HINCRBY', KEYS[5], ARGV[7], 1)
    return {0, math.max(math.ceil(wait), 1), 'rate_limited', 0}
  end

  -- Slots of steps that never came back (a worker died) are forgotten; the tail is kept.
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (now - keep))
  local tail = tonumber(redis.call('ZSCORE', KEYS[4], '') or '0')
  local slot = nil
  if holder ~= '' then slot = tonumber(redis.call('ZSCORE', KEYS[4], holder)) end
  if slot and now < slot then return refuse(slot - now) end
  if not slot and holder ~= '' and tail > now then
    -- Others are queued ahead: the next slot after theirs.
    slot = tail + interval
    redis.call('ZADD', KEYS[4], slot, '', slot, holder)
    redis.call('PEXPIRE', KEYS[4], math.ceil(slot - now + keep))
    return refuse(slot - now)
  end

  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
  -- When each of the step's calls will go out: the first now, each next one its lead later.
  local at = {now}
  for i = 2, calls do
    at[i] = math.max(at[i - 1], now + math.floor(tonumber(redis.call('HGET', KEYS[6], i) or '0')))
  end
  -- The windows one of them would fall in end at one of them or at a call reserved ahead of now
  -- (another step's later call); the fullest of those windows ends at one of these times.
  local ends = {}
  for i = 1, calls do ends[i] = at[i] end
  local ahead = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now, '+inf', 'WITHSCORES')
  for i = 2, #ahead, 2 do ends[#ends + 1] = tonumber(ahead[i]) end
  local fits = true
  for _, t_end in ipairs(ends) do
    local n = redis.call('ZCOUNT', KEYS[3], '(' .. (t_end - window), t_end)
    for i = 1, calls do
      if at[i] > t_end - window and at[i] <= t_end then n = n + 1 end
    end
    if n > limit then fits = false break end
  end
  if not fits then
    -- Free (enough, if not always first) once, for each call i, at most LIMIT - i of the calls
    -- counted now would still be in the window ending at that call.
    local taken = redis.call('ZCARD', KEYS[3])
    local free = now + 1
    for i = 1, calls do
      local k = taken - (limit - i)  -- from 1, the oldest
      if k >= 1 then
        local kth = redis.call('ZRANGE', KEYS[3], k - 1, k - 1, 'WITHSCORES')
        free = math.max(free, tonumber(kth[2]) + window - (at[i] - now))
      end
    end
    if holder ~= '' and not slot then
      -- The queue begins (or goes on) here: the first slot is the next free call.
      slot = math.max(free, tail + interval)
      redis.call('ZADD', KEYS[4], slot, '', slot, holder)
      redis.call('PEXPIRE', KEYS[4], math.ceil(slot - now + keep))
      return refuse(slot - now)
    end
    -- Back on time (or nobody's): the window's next free call, keeping the slot it has.
    return refuse(free - now)
  end
  if slot then redis.call('ZREM', KEYS[4], holder) end
  for i = 1, calls do redis.call('ZADD', KEYS[3], at[i], ARGV[4] .. ':' .. i) end
  -- Kept until the last call reserved (this step's or another's) has left its window.
  local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[3], window + math.max(tonumber(last[2]) - now, 0))
end
local probe = 0
if state == 'half_open' then probe = 1 end
return {1, clean, probe, now}
