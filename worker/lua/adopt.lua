-- Adopt the first listed stage that no other add has claimed (reconciling an add of unknown outcome).
-- KEYS: 1 account claims hash (stage id -> job id)
-- ARGV: 1 job id, 2.. candidate stage ids, oldest first
-- Returns the claimed stage id, or false when every candidate belongs to another add.
for i = 2, #ARGV do
  local owner = redis.call('HGET', KEYS[1], ARGV[i])
  if not owner then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
    return ARGV[i]
  end
  if owner == ARGV[1] then return ARGV[i] end
end
return false
