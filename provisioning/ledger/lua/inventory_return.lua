-- An Order's ICCID back in the free stock after its profile was cancelled on the SM-DP+ (cancelOrder
-- with Available): the claim goes, and the ICCID is no longer used. Only once the SM-DP+ said so: a
-- used profile that was downloaded never comes back (see inventory_release.lua for an unused claim).
--
-- KEYS[1]  the free ICCIDs  (set)
-- KEYS[2]  the claims       (hash)
-- KEYS[3]  the used ICCIDs  (set)
-- ARGV[1]  the Order's effect key
--
-- Returns {status, ICCID}: 1 returned now, 0 no claim (returned before, or never claimed; ICCID false).
local iccid = redis.call('HGET', KEYS[2], ARGV[1])
if not iccid then return {0, false} end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], iccid)
redis.call('SADD', KEYS[1], iccid)
return {1, iccid}
