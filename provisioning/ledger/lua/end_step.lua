-- A step's end: its result recorded, and the Order's lease given back if it is still ours.
-- (After the run's last step, end_run.lua goes in the same round trip.)
--
-- KEYS[1]  the run                      (hash)
-- KEYS[2]  who records the step: the run, or the Order's provisioning  (hash)
-- KEYS[3]  the Order's lease            (string)
-- ARGV[1]  the step's name
-- ARGV[2]  the record: JSON {result, at, run}
-- ARGV[3]  the lease token this worker holds ('' for none)
-- ARGV[4]  now, in seconds
--
-- Returns 1.
redis.call('HSET', KEYS[2], 's:' .. ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
return 1
