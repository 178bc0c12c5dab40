-- The ICCID of an Order: the one it claimed before (a repeat gets the same one), else a free one
-- taken for it.
--
-- KEYS[1]  the free ICCIDs                           (set)
-- KEYS[2]  the claims: the Order's effect key → ICCID (hash)
-- ARGV[1]  the Order's effect key
--
-- Returns {ICCID or false (none free), the free ICCIDs left}: the low-stock warning costs no round
-- trip of its own.
local iccid = redis.call('HGET', KEYS[2], ARGV[1])
if not iccid then
  iccid = redis.call('SPOP', KEYS[1])
  if iccid then redis.call('HSET', KEYS[2], ARGV[1], iccid) end
end
return {iccid, redis.call('SCARD', KEYS[1])}
