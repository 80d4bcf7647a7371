-- Reads of keys that may hold another program's value (another kind than leadstage keeps there),
-- shared by start.lua and batch.lua (each names this file in an `--#include` line): a script that
-- has written already cannot let such a read fail (Redis would keep its writes before), so it
-- reads with `read` and stops before the key, and a script that has written nothing yet answers
-- `foreign` instead of writing.

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
