-- The stock, counted in one go.
--
-- KEYS[1]  the free ICCIDs  (set)
-- KEYS[2]  the claims       (hash)
-- KEYS[3]  the used ICCIDs  (set)
--
-- Returns {free, claims (used ones included), used}.
return {redis.call('SCARD', KEYS[1]), redis.call('HLEN', KEYS[2]), redis.call('SCARD', KEYS[3])}
