-- A profile released to an Order (the eSIM step's end): the start of its state, once.
--
-- A repeat (the step run again, a re-approval) changes nothing: notifications may have moved it on.
--
-- KEYS[1]  the ICCID's status                      (hash)
-- KEYS[2]  the profiles released and not installed (zset: ICCID -> released_at)
-- KEYS[3]  the profiles per state                  (hash: state -> count)
-- ARGV[1]  the ICCID
-- ARGV[2]  the Order id
-- ARGV[3]  the Order's effect key (its inventory claim)
-- ARGV[4]  now, in seconds
--
-- Returns 1 when recorded now, 0 when it was already.
if redis.call('HSETNX', KEYS[1], 'key', ARGV[3]) == 0 then return 0 end
local ms = string.format('%d', math.floor(tonumber(ARGV[4]) * 1000))
redis.call('HSET', KEYS[1], 'iccid', ARGV[1], 'order_id', ARGV[2], 'state', 'released',
           'state_ts', ms, 'released_at', ARGV[4], 'changed_at', ARGV[4])
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'released', 1)
return 1
