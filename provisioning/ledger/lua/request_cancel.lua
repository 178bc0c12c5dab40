-- An Order's cancellation, recorded once: the first request wins, a repeat changes nothing.
--
-- Every forward step's claim (claim_step.lua) reads 'cancel_at' on the Order's provisioning in the
-- same script that takes the Order's lease, so a step claimed after this script ran makes no effect,
-- and a step claimed before it holds the lease the cancellation's own steps wait for.
--
-- KEYS[1]  the Order's provisioning     (hash)
-- ARGV[1]  now, in seconds
-- ARGV[2]  the reason (text)
-- ARGV[3]  who asked (an operator's name, 'salesforce')
--
-- Returns {new (1: recorded now, 0: it was cancelled before), cancel_at, reason, by, gen}.
local at = redis.call('HGET', KEYS[1], 'cancel_at')
if not at then
  redis.call('HSET', KEYS[1], 'cancel_at', ARGV[1], 'cancel_reason', ARGV[2], 'cancel_by', ARGV[3])
  redis.call('HSETNX', KEYS[1], 'gen', '1')
  -- Nothing of an Order being cancelled expires before its cancellation is done.
  redis.call('PERSIST', KEYS[1])
  return {1, ARGV[1], ARGV[2], ARGV[3], redis.call('HGET', KEYS[1], 'gen')}
end
return {0, at, redis.call('HGET', KEYS[1], 'cancel_reason') or '', redis.call('HGET', KEYS[1], 'cancel_by') or '',
        redis.call('HGET', KEYS[1], 'gen') or '1'}
