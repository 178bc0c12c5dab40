-- The end of a run, whatever it is: the one place a run leaves the registries it was in.
--
--   done        it provisioned its Order: the Order's snapshot (personal data) goes, and the run,
--               the provisioning and the Order's runs expire after the retention period
--   skipped     it never acted (the Order was not Activating, or not found)
--   joined      another run of the Order was in flight: that one provisions it
--   superseded  it had failed, and a newer run of the Order continued its work
--   cancelled   the Order was cancelled: a forward step's claim found it (claim_step.lua) and ended the
--               run before any further effect; the cancellation's own run (done) cleans up after it
--   failed      it stopped at a step: it joins the failed registry and the write-backs (the Order
--               may not show Failed yet), and nothing of it expires until it is requeued or superseded
-- Every ending leaves the unfinished runs and enters the operators' list of runs (trimmed to the
-- retention period).
--
-- KEYS[1]  the run                      (hash)
-- KEYS[2]  the Order's provisioning     (hash)
-- KEYS[3]  the Order's runs             (zset)
-- KEYS[4]  the Order's snapshot         (string)
-- KEYS[5]  the unfinished runs: active  (zset)
-- KEYS[6]  the failed runs              (zset)
-- KEYS[7]  the failure write-backs      (zset)
-- KEYS[8]  the operators' list of runs  (zset, scored by when each began or ended)
-- ARGV[1]  JSON: {run_id, state, now (seconds, as text: a JSON number would lose digits in Lua),
--          retention_s (a number), and optionally note, joined, superseded_by, failed_step and
--          error (the last two for failed)}
--
-- Returns 1.
local a = cjson.decode(ARGV[1])
local run, now = a.run_id, a.now
redis.call('HSETNX', KEYS[1], 'created_at', now)
redis.call('HSET', KEYS[1], 'state', a.state, 'updated_at', now)
for _, name in ipairs({'note', 'joined', 'superseded_by'}) do
  if a[name] then redis.call('HSET', KEYS[1], name, a[name]) end
end
redis.call('ZADD', KEYS[3], 'NX', now, run)
redis.call('ZREM', KEYS[5], run)
redis.call('ZADD', KEYS[8], now, run)
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', tonumber(now) - a.retention_s)
if a.state == 'failed' then
  redis.call('HSET', KEYS[1], 'failed_step', a.failed_step, 'error', a.error, 'e:' .. a.failed_step, a.error)
  for i = 1, 4 do redis.call('PERSIST', KEYS[i]) end
  redis.call('ZADD', KEYS[6], now, run)
  redis.call('ZADD', KEYS[7], now, run)
  return 1
end
redis.call('HSET', KEYS[1], 'finished_at', now)
redis.call('HDEL', KEYS[1], 'failed_step', 'error')
redis.call('ZREM', KEYS[6], run)
redis.call('ZREM', KEYS[7], run)
redis.call('EXPIRE', KEYS[1], a.retention_s)
if a.state == 'done' then
  redis.call('DEL', KEYS[4])
  redis.call('EXPIRE', KEYS[2], a.retention_s)
  redis.call('EXPIRE', KEYS[3], a.retention_s)
end
return 1
