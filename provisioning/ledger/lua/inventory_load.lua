-- Load ICCIDs into the free stock; an ICCID ever loaded before is skipped (a reload adds nothing twice).
--
-- KEYS[1]  the free ICCIDs          (set)
-- KEYS[2]  every ICCID ever loaded  (set)
-- ARGV     the ICCIDs, canonical
--
-- Returns how many were new.
local added = 0
for i = 1, #ARGV do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('SADD', KEYS[1], ARGV[i])
    added = added + 1
  end
end
return added
