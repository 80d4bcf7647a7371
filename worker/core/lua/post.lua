-- The recovery point just before a POST that follows a reconcile: from now on a request of this
-- run may be in flight, and another worker waits out the in-flight guard before it takes over.
-- KEYS: 1 ledger hash, 2 the account's newest-claim key
-- ARGV: 1 run (fencing token)
-- Reply: {'ok', posted at (server ms)} | {'stale', ''} when another run owns the change now.
local ledger, newest_claim = KEYS[1], KEYS[2]
local run = ARGV[1]
local l = redis.call('HMGET', ledger, 'run', 'state')
if l[1] ~= run or l[2] ~= 'running' then return {'stale', ''} end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', ledger, 'phase', 'posting', 'posted_at', now_ms)
-- Stages at or below the newest claimed id existed before this add was first posted.
redis.call('HSETNX', ledger, 'id_floor', redis.call('GET', newest_claim) or '0')
return {'ok', tostring(now_ms)}
