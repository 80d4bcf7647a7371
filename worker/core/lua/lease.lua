-- The heartbeat: keep this worker's running attempts hidden for another lease, by the server's
-- clock, and say that the worker is alive. An attempt is extended only while it is still the
-- change's current run by this worker (fencing): a stale one is left to lapse.
-- KEYS: 1 workers hash, then for each running job: its account queue zset, its ledger hash. On a
--       Redis Cluster one call per account (its slot), with KEYS 1 its queue and ARGV 3 '': the
--       workers hash is written by a call of its own, without jobs.
-- ARGV: 1 lease (ms), 2 worker id, 3 running count, 4.. for each running job: job id, run
-- Reply: one 1 (extended) or 0 (stale: another run owns the change now) per job, in order.
local workers = KEYS[1]
local lease_ms, worker_id = tonumber(ARGV[1]), ARGV[2]
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
if ARGV[3] ~= '' then redis.call('HSET', workers, worker_id, ARGV[3] .. '|' .. now_ms) end
local extended = {}
for i = 1, (#KEYS - 1) / 2 do
  local queue, ledger = KEYS[2 * i], KEYS[2 * i + 1]
  local job, run = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local l = redis.call('HMGET', ledger, 'run', 'worker', 'state')
  if l[1] == run and l[2] == worker_id and l[3] == 'running' then
    redis.call('ZADD', queue, 'XX', now_ms + lease_ms, job)
    extended[#extended + 1] = 1
  else
    extended[#extended + 1] = 0
  end
end
return extended
