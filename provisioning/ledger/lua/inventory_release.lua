-- Give an Order's claimed ICCID back to the free stock, unless it is used (activated).
--
-- KEYS[1]  the free ICCIDs  (set)
-- KEYS[2]  the claims       (hash)
-- KEYS[3]  the used ICCIDs  (set)
-- ARGV[1]  the Order's effect key
--
-- Returns {status, ICCID}: status 1 released, 0 no claim (ICCID false), -1 used (not released).
local iccid = redis.call('HGET', KEYS[2], ARGV[1])
if not iccid then return {0, false} end
if redis.call('SISMEMBER', KEYS[3], iccid) == 1 then return {-1, iccid} end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[1], iccid)
return {1, iccid}
