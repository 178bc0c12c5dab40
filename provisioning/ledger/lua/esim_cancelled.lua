-- A profile cancelled on the SM-DP+ by the Order's cancellation (or the stale-stock reclaim): final.
-- The Order's write-back is queued (the notification server's writer says Cancelled on the Order).
--
-- KEYS[1]  the ICCID's status                      (hash)
-- KEYS[2]  the profiles released and not installed (zset)
-- KEYS[3]  the Orders' eSIM status write-backs     (zset)
-- KEYS[4]  the profiles per state                  (hash: state -> count)
-- ARGV[1]  the ICCID
-- ARGV[2]  now, in seconds
--
-- Returns 1 when it changed now, 0 when it was cancelled already or never released.
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'cancelled' then return 0 end
local ms = string.format('%d', math.floor(tonumber(ARGV[2]) * 1000))
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'state_ts', ms, 'changed_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'reason')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[4], state, -1)
redis.call('HINCRBY', KEYS[4], 'cancelled', 1)
return 1
