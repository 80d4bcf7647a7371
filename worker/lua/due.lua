-- The job ids that are due by the server's clock (the worker's poll; no client clock involved).
-- KEYS: 1 queue zset
-- ARGV: 1 how many at most
-- Reply: the due job ids, soonest first.
local queue, limit = KEYS[1], ARGV[1]
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
return redis.call('ZRANGEBYSCORE', queue, '-inf', now_ms, 'LIMIT', 0, limit)
