-- A half-open circuit's probe that did not call after all (its step was done already, or waited for
-- the Order's lease): let the next step probe at once instead of after the probe's expiry.
--
-- KEYS[1]  the system's probe  (string: the admission id that holds it)
-- ARGV[1]  this admission's id
--
-- Returns 1 when it was this admission's probe (now released), else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
