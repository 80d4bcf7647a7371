-- Adopt the first listed stage that no other add has claimed (reconciling an add of unknown
-- outcome), for the change's current run only.
-- KEYS: 1 account claims hash (stage id -> job id), 2 ledger hash, 3 the account's newest-claim key
-- ARGV: 1 job id, 2 run (fencing token), 3.. candidate stage ids, oldest first
-- Reply: {'adopted', stage id} | {'none', ''} when every candidate belongs to another add |
--   {'stale', ''} when another run owns the change now.
local claims, ledger, newest_claim = KEYS[1], KEYS[2], KEYS[3]
local job, run = ARGV[1], ARGV[2]
local l = redis.call('HMGET', ledger, 'run', 'state')
if l[1] ~= run or l[2] ~= 'running' then return {'stale', ''} end
for i = 3, #ARGV do
  local owner = redis.call('HGET', claims, ARGV[i])
  if not owner or owner == job then
    redis.call('HSET', claims, ARGV[i], job)
    if tonumber(ARGV[i]) > (tonumber(redis.call('GET', newest_claim)) or 0) then
      redis.call('SET', newest_claim, ARGV[i])
    end
    return {'adopted', ARGV[i]}
  end
end
return {'none', ''}
