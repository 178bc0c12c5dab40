-- Record a new run as queued, before the task of its first step is published.
--
-- KEYS[1]  the run                      (hash)
-- KEYS[2]  the Order's runs             (zset, scored by creation time)
-- KEYS[3]  the unfinished runs: active  (zset, scored by last update)
-- ARGV[1]  the run id
-- ARGV[2]  now, in seconds (a float as text)
-- ARGV[3]  the origin: event, reconciler or operator
-- ARGV[4]  why an operator started it ('' for none)
--
-- Returns 1 for a new run; 2 for a known run still queued (its task may never have been sent:
-- publish it); 0 for a run that began or ended (a duplicate event: publish nothing).
if redis.call('HSETNX', KEYS[1], 'state', 'queued') == 0 then
  if redis.call('HGET', KEYS[1], 'state') == 'queued' then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'updated_at', ARGV[2], 'origin', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[4]) end
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
