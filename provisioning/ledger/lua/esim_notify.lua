-- One ES2+ handleDownloadProgressInfo notification: recorded once, and the eSIM's state moved by it.
--
-- Dedupe: the SM-DP+ may deliver a notification more than once (at-least-once) and out of order; the
-- operator dedupes on ICCID + notificationPointId + timestamp. Each seen (point, timestamp) is a field
-- 'n:<point>:<timestamp in ms>' of the ICCID's status hash, set with HSETNX: the second is a duplicate.
--
-- The state machine (released -> downloaded -> installed, or error with the reason):
--   a success moves the state forward only (rank released 0 < downloaded 1 < installed 2): a late
--   'downloaded' after 'installed' changes nothing;
--   an error (any point whose status is Failed) applies over 'released' always, and over a notified
--   state when it is not older than it; a success after an error applies when it is not older than
--   the error (a retried download that worked). 'released' is stamped by our clock when the eSIM step
--   records it, the notifications by the SM-DP+'s: a device may fail within milliseconds of the
--   release, before the step has recorded it, so the two clocks are never compared;
--   'cancelled' (the Order's cancellation cancelled the profile) is final.
-- A change sets 'changed_at', queues the Order's write-back (the ICCID in the write-back zset, scored
-- by the change) and moves the per-state counts; 'installed' and 'cancelled' leave the pending zset.
--
-- KEYS[1]  the ICCID's status                      (hash: key, order_id, state, state_ts, reason, ...)
-- KEYS[2]  the profiles released and not installed (zset: ICCID -> released_at)
-- KEYS[3]  the Orders' eSIM status write-backs     (zset: ICCID -> when it changed)
-- KEYS[4]  the profiles per state                  (hash: state -> count)
-- KEYS[5]  the run metrics' counters                (hash: the outcome counted under ARGV[7] .. outcome)
-- ARGV[1]  the notificationPointId
-- ARGV[2]  the notification's timestamp, in ms since the epoch
-- ARGV[3]  the point's status ('Executed-Success', 'Failed', ...)
-- ARGV[4]  the state it asks for: 'downloaded', 'installed', 'error', or '' (no change: recorded only)
-- ARGV[5]  the reason (an error's), '' otherwise
-- ARGV[6]  now, in seconds
-- ARGV[7]  the counter field's prefix: the outcome (unknown, duplicate, recorded, changed) ends it
--
-- Returns {'unknown'} (no Order released this ICCID), or {'duplicate', state}, or
-- {'recorded', changed (0|1), state, order_id}.
local function counted(outcome) redis.call('HINCRBY', KEYS[5], ARGV[7] .. outcome, 1) end
if redis.call('HEXISTS', KEYS[1], 'key') == 0 then counted('unknown'); return {'unknown'} end
local recorded_state = redis.call('HGET', KEYS[1], 'state')
-- Registered (downloadOrder) but not released yet: it counts as released.
local state = recorded_state or 'released'
if redis.call('HSETNX', KEYS[1], 'n:' .. ARGV[1] .. ':' .. ARGV[2], ARGV[3]) == 0 then
  counted('duplicate')
  return {'duplicate', state}
end
local order_id = redis.call('HGET', KEYS[1], 'order_id') or ''
local wanted, ts = ARGV[4], tonumber(ARGV[2])
local state_ts = tonumber(redis.call('HGET', KEYS[1], 'state_ts') or '0')
local rank = {released = 0, downloaded = 1, installed = 2}
local apply = false
if wanted ~= '' and state ~= 'cancelled' then
  if wanted == 'error' then
    apply = (state == 'released' or ts >= state_ts) and not (state == 'error' and redis.call('HGET', KEYS[1], 'reason') == ARGV[5])
  elseif state == 'error' then
    apply = ts >= state_ts
  else
    apply = rank[wanted] > (rank[state] or 0)
  end
end
if not apply then counted('recorded'); return {'recorded', 0, state, order_id} end
counted('changed')
redis.call('HSET', KEYS[1], 'state', wanted, 'state_ts', ARGV[2], 'changed_at', ARGV[6])
if wanted == 'error' then
  redis.call('HSET', KEYS[1], 'reason', ARGV[5])
else
  redis.call('HDEL', KEYS[1], 'reason')
end
if wanted == 'installed' then redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'iccid')) end
redis.call('ZADD', KEYS[3], ARGV[6], redis.call('HGET', KEYS[1], 'iccid'))
if state ~= wanted or not recorded_state then
  if recorded_state then redis.call('HINCRBY', KEYS[4], recorded_state, -1) end
  redis.call('HINCRBY', KEYS[4], wanted, 1)
end
return {'recorded', 1, wanted, order_id}
