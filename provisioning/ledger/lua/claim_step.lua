-- A step's start, in one round trip: is it to run, and if so the Order's lease and what it reads.
--
-- KEYS[1]  the run                          (hash)
-- KEYS[2]  the Order's provisioning         (hash)
-- KEYS[3]  the Order's lease                (string: the holder's token, with expiry)
-- KEYS[4]  the Order's snapshot             (string: JSON)
-- KEYS[5]  the unfinished runs: active      (zset)
-- ARGV[1]  the step's name
-- ARGV[2]  '1' when the Order records the step (its result is on the provisioning), '0': the run
-- ARGV[3]  a new lease token
-- ARGV[4]  the lease's time to live, in milliseconds
-- ARGV[5]  now, in seconds
-- ARGV[6]  the run id
-- ARGV[7]  a marker to set on the Order unless it has it ('' for none): the step's stamp
-- ARGV[8]  that marker's value
-- ARGV[9]  '1' for a forward step (the step table's): the Order's cancellation ends its run here;
--          '0' for a step of the cancellation itself (runs/cancellation.py)
--
-- The cancellation: once the Order's provisioning has 'cancel_at' (Orders.request_cancel, atomic), a
-- forward step's claim of a run that has not ended answers 'cancelled' before anything else (before
-- 'done', before the lease): no further effect of that run. The caller ends the run (end_run.lua,
-- state 'cancelled'); should it die first, the run is still unfinished and its next claim says it again.
--
-- Returns one of:
--   {'ended', state}                   the run failed, joined, was superseded, skipped or cancelled: stop
--   {'cancelled', state}               the Order was cancelled: end the run as cancelled, stop
--   {'done', result JSON, state}       the step is done (for a run that has begun)
--   {'busy'}                           another worker holds the Order's lease
--   {'go', state, attempts, run fields, provisioning fields, snapshot or false}
local state = redis.call('HGET', KEYS[1], 'state') or ''
if state == 'failed' or state == 'joined' or state == 'superseded' or state == 'skipped'
   or state == 'cancelled' then
  return {'ended', state}
end
if ARGV[9] == '1' and state ~= 'done' and redis.call('HEXISTS', KEYS[2], 'cancel_at') == 1 then
  return {'cancelled', state}
end
local holder = KEYS[1]
if ARGV[2] == '1' then holder = KEYS[2] end
local done = redis.call('HGET', holder, 's:' .. ARGV[1])
-- A run that has not begun takes the lease even for a step the Order has done: it begins first.
if done and state ~= '' and state ~= 'queued' then return {'done', done, state} end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then return {'busy'} end
-- A run that has not begun counts the step's attempt once it has (its beginning may not get that far).
local attempts = 0
if state ~= '' and state ~= 'queued' then
  attempts = redis.call('HINCRBY', KEYS[1], 'a:' .. ARGV[1], 1)
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[5])
  redis.call('ZADD', KEYS[5], 'XX', ARGV[5], ARGV[6])
end
if ARGV[7] ~= '' then redis.call('HSETNX', KEYS[2], 'x:' .. ARGV[7], ARGV[8]) end
return {'go', state, attempts, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('GET', KEYS[4])}
