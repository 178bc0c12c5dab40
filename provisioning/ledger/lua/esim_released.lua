-- A profile's owner and the start of its state: registered before downloadOrder, released at the eSIM
-- step's end. Both are once: a repeat changes nothing, and a notification that came first keeps its
-- state (the SM-DP+ may notify an eligibility or confirmation failure before our step has ended).
--
-- KEYS[1]  the ICCID's status                      (hash)
-- KEYS[2]  the profiles released and not installed (zset: ICCID -> released_at)
-- KEYS[3]  the profiles per state                  (hash: state -> count)
-- ARGV[1]  the ICCID
-- ARGV[2]  the Order id
-- ARGV[3]  the Order's effect key (its inventory claim)
-- ARGV[4]  now, in seconds
-- ARGV[5]  'register' (before downloadOrder: the owner only) or 'release' (confirmOrder released it)
--
-- Returns 1 when this call recorded something new, 0 otherwise.
local new = redis.call('HSETNX', KEYS[1], 'key', ARGV[3])
redis.call('HSETNX', KEYS[1], 'iccid', ARGV[1])
redis.call('HSETNX', KEYS[1], 'order_id', ARGV[2])
if ARGV[5] == 'register' then return new end
if redis.call('HSETNX', KEYS[1], 'released_at', ARGV[4]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'changed_at', ARGV[4])
if redis.call('HSETNX', KEYS[1], 'state', 'released') == 1 then
  redis.call('HSET', KEYS[1], 'state_ts', string.format('%d', math.floor(tonumber(ARGV[4]) * 1000)))
  redis.call('HINCRBY', KEYS[3], 'released', 1)
end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'installed' and state ~= 'cancelled' then redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[1]) end
return 1
