-- Keys that may hold another program's value (another kind than leadstage keeps there), shared by
-- the scripts that name this file in an `--#include` line. Redis keeps a script's writes before a
-- command it refuses (WRONGTYPE), so a script checks the keys it writes after its first write
-- before that write (`mismatch`), and one that has written already reads such a key with `read` and
-- stops before it; a script that has written nothing yet answers the key instead of writing.

-- {key, the kind it holds, the kind leadstage keeps there} of the first such key read, or nil.
local foreign = nil

-- Redis's reply to `command` on `key`, or nil (and `foreign` set) when the key holds another kind
-- of value than `kind`.
local function read(kind, command, key, ...)
  local reply = redis.pcall(command, key, ...)
  if type(reply) == 'table' and reply['err'] then
    foreign = {key, redis.call('TYPE', key)['ok'], kind}
    return nil
  end
  return reply
end

-- The first key of `kinds` (key -> the kind leadstage keeps there) that holds another kind of
-- value, as {key, the kind it holds, the kind leadstage keeps there}; nil when none does (a
-- missing key holds nothing).
local function mismatch(kinds)
  for key, kind in pairs(kinds) do
    local held = redis.call('TYPE', key)['ok']
    if held ~= 'none' and held ~= kind then return {key, held, kind} end
  end
  return nil
end
