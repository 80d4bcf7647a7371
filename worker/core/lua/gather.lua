-- Coalescing: the run of an update that start.lua let go (it holds its stage's lock) gathers the
-- other updates of the same stage that are due now, so that one request carries them all. They are
-- found in the stage hash (worker.keys.stage_key: a field per pending update, written at enqueue,
-- removed by the terminal finish). Each change gathered begins a run of this worker, counts an
-- attempt and gets its recovery point, as start.lua's go does; a change that start.lua would not
-- send now is left alone for its own claim: running (another worker has it), a backoff not over, a
-- request maybe in flight or of unknown outcome (phase), out of attempts or too old, or every field
-- set by a newer change (superseded). A pending field whose change is
-- terminal or gone (an expired ledger entry) is removed.
-- KEYS: 1 account queue zset, 2 the leader's ledger hash
-- ARGV: 1 the leader's job id, 2 its run, 3 lease (ms), 4 worker id, 5 the account's ledger key
--       prefix, 6 the most changes to gather, 7 the pending field prefix, 8 max attempts,
--       9 max age (ms)
-- Reply, fixed shape (worker.core.gather parses it):
--   {status ('ok' | 'stale': the leader's run is not current), the leader's seq,
--    {field, seq of the newest change that set it, ...} (the stage hash's change fields),
--    {{job id, run, attempt, seq, change, source, enqueued at (ms), generation}, ...}}
local queue, leader_ledger = KEYS[1], KEYS[2]
local leader, leader_run, lease_ms, worker_id = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local ledger_prefix, most, pending_prefix = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local max_attempts, max_age_ms = tonumber(ARGV[8]), tonumber(ARGV[9])

local own = redis.call('HMGET', leader_ledger, 'run', 'state', 'stage_key', 'seq')
if own[1] ~= leader_run or own[2] ~= 'running' or not own[3] then return {'stale', 0, {}, {}} end
local stage_key = own[3]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local stage = redis.call('HGETALL', stage_key)
local newest, fields, pending = {}, {}, {}
for i = 1, #stage, 2 do
  local name, value = stage[i], stage[i + 1]
  if string.sub(name, 1, #pending_prefix) == pending_prefix then
    pending[#pending + 1] = {tonumber(string.sub(name, #pending_prefix + 1)), value, name}
  elseif name ~= 'seq' then
    newest[name] = tonumber(value)
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
-- In enqueue order: the oldest due changes first, as they would be claimed.
table.sort(pending, function(a, b) return a[1] < b[1] end)

local gathered = {}
for _, p in ipairs(pending) do
  if #gathered >= most then break end
  local job = p[2]
  if job ~= leader then
    local ledger = ledger_prefix .. string.sub(job, string.find(job, ':', 1, true) + 1)
    local l = redis.call('HMGET', ledger, 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
      'fields', 'stage_key', 'run', 'change', 'source', 'gen')
    if not l[1] or l[1] == 'succeeded' or l[1] == 'failed' or l[1] == 'superseded' or tonumber(l[7]) ~= p[1] then
      redis.call('HDEL', stage_key, p[3])
    else
      local attempts, seq = tonumber(l[3]) or 0, p[1]
      -- Its place in the queue does not matter: one put back because this stage was locked (by
      -- the leader) or the rate limit had no slot is sendable all the same; one running elsewhere
      -- is not queued or retrying.
      local sendable = (l[1] == 'queued' or l[1] == 'retrying') and (l[2] or '') == '' and l[9] == stage_key
        and (tonumber(l[5]) or 0) <= now and attempts < max_attempts and now - (tonumber(l[4]) or 0) <= max_age_ms
      local kept = false
      if sendable then
        for field in string.gmatch(l[8] or '', '[^,]+') do
          if (newest[field] or 0) <= seq then kept = true end
        end
      end
      if kept then
        local run = (tonumber(l[10]) or 0) + 1
        redis.call('HSET', ledger, 'state', 'running', 'run', run, 'worker', worker_id, 'attempts', attempts + 1,
          'phase', 'posting', 'posted_at', now)
        redis.call('PERSIST', ledger) -- no expiry until it is done
        redis.call('ZADD', queue, now + lease_ms, job)
        gathered[#gathered + 1] = {job, run, attempts + 1, seq, l[11], l[12] or '', l[4] or '0', l[13] or '0'}
      end
    end
  end
end
return {'ok', tonumber(own[4]) or 0, fields, gathered}
