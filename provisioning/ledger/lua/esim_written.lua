-- An Order's eSIM status written to Salesforce: off the write-back queue, unless it changed again since.
--
-- KEYS[1]  the Orders' eSIM status write-backs  (zset: ICCID -> when it changed)
-- ARGV[1]  the ICCID
-- ARGV[2]  the score read before the write (the change it wrote)
--
-- Returns 1 when removed, 0 when a newer change is waiting (it is written next time).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
