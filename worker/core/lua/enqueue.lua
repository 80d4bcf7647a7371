-- Enqueue changes (or replay a dead-lettered one): for each, the ledger entry, the ordering
-- sequence and the entry in its account's queue. Atomic for the whole call: with 'enqueue', every
-- key is checked before anything is written, so a conflict anywhere writes nothing. 'check'
-- enqueues nothing: it checks each key against the ledger and against the staging hash of its bulk
-- enqueue (KEYS[3]), which holds every key checked so far in that bulk as 'label<newline>change',
-- so that a key given twice with different changes is found across calls, before the bulk's first
-- write. The ledger hash is the job's record; the queue holds only its id. Times are the server's.
-- KEYS: 1 dead-letter stream, 2 pending hash (account -> changes not yet terminal), 3 staging hash
--       ('check' only)
-- ARGV: 1 mode ('enqueue' | 'check' | 'replay'), 2 retention (ms), 3 dead-letter entry id to
--       remove or '' (replay), 4 generation of that dead letter or '' (replay), 5 the changes: a
--       JSON array of [job id, change (canonical JSON), operation, stage id or '', changed fields
--       (csv), account, idempotency key, source, ledger key, stage key or '' (adds), lock key,
--       account queue key, traceparent or '' (worker.tracing; stored as 'trace', never compared:
--       only the change is)], 6 ('check' only) a JSON array of each change's label (its place in
--       the bulk, as text without newlines), 7 ('check' only) the staging hash's time to live (ms)
-- One JSON argument instead of a dozen per change keeps the client's work per change small; every
-- key name in it is made by worker.keys (the account's keys share its hash tag, so one cluster
-- slot per account), and the ledger keeps the names of its stage hash and lock for start.lua.
-- Reply: {answers, backlog} with one answer per change: {'queued', generation} |
--   {'duplicate', state} | {'conflict', ''} | {'not_failed', state} (replay) | {'new', ''} (check) |
--   {'twice', label of the change that used the key first} (check: the key comes twice in the
--   bulk with different changes);
--   backlog: {account, changes of that account not yet terminal, ...} for the accounts written to;
--   or {{}, {}, {key, the kind of value it holds, the kind this script keeps there}} when a key it
--   would write holds another kind (another program writes into this database): nothing written.
local dlq, pending = KEYS[1], KEYS[2]
local mode, retention = ARGV[1], ARGV[2]

--#include kinds.lua

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local changes = cjson.decode(ARGV[5])
local function ledger_key(c) return c[9] end

local answers, seen, conflict = {}, {}, false
local labels = mode == 'check' and cjson.decode(ARGV[6])
-- One EXISTS for the whole call: when none of its keys is known (a new bulk), no entry is read.
local ledgers, jobs = {}, {}
for i, c in ipairs(changes) do
  ledgers[i] = ledger_key(c)
  jobs[i] = c[1]
end
local known = redis.call('EXISTS', unpack(ledgers)) > 0
-- A write refused midway (WRONGTYPE) would leave the writes before it (a ledger entry 'queued' that
-- no queue holds, never sent): every key this call may read or write is checked first.
local kinds = {[pending] = 'hash'}
if mode == 'check' then kinds[KEYS[3]] = 'hash' end
-- The dead-letter stream only when a replay deletes from it (on a Redis Cluster the pending hash
-- stands in for it: enqueue_arguments).
if mode == 'replay' and ARGV[3] ~= '' and dlq ~= pending then kinds[dlq] = 'stream' end
for i, c in ipairs(changes) do
  kinds[c[12]] = 'zset'
  if c[10] ~= '' then kinds[c[10]] = 'hash' end
  if known then kinds[ledgers[i]] = 'hash' end
end
local refused = mismatch(kinds)
if refused then return {{}, {}, refused} end
-- 'check': what the bulk's earlier calls staged, read at once; this call's keys are staged at once.
local staged = mode == 'check' and redis.call('HMGET', KEYS[3], unpack(jobs))
local staging = {}
for i, c in ipairs(changes) do
  local job, change = c[1], c[2]
  local existing = known and redis.call('HMGET', ledgers[i], 'change', 'state', 'gen') or {}
  if seen[job] then existing = {seen[job], 'queued', '0'} end
  if mode == 'check' and not existing[1] then
    local earlier = staged[i] or staging[job]
    if not earlier then
      staging[job] = labels[i] .. '\n' .. change
      answers[i] = {'new', ''}
    else
      local gap = string.find(earlier, '\n', 1, true)
      if string.sub(earlier, gap + 1) == change then answers[i] = {'new', ''} else
        answers[i] = {'twice', string.sub(earlier, 1, gap - 1)}
      end
    end
  elseif mode == 'replay' then
    if existing[2] and existing[2] ~= 'failed' then
      answers[i] = {'not_failed', existing[2]}
    else
      answers[i] = {'queued', (tonumber(existing[3]) or tonumber(ARGV[4]) or 0) + 1}
    end
  elseif existing[1] then
    if existing[1] == change then answers[i] = {'duplicate', existing[2]} else
      answers[i] = {'conflict', ''}
      conflict = true
    end
  else
    answers[i] = {'new', ''}
    seen[job] = change
  end
end
if mode == 'check' then
  local fields = {}
  for job, value in pairs(staging) do
    fields[#fields + 1] = job
    fields[#fields + 1] = value
  end
  if #fields > 0 then redis.call('HSET', KEYS[3], unpack(fields)) end
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
  return {answers, {}}
end
if conflict then return {answers, {}} end

-- Each account's queue gets its new jobs in one ZADD, and its pending count one HINCRBY.
local written, queued, queues = {}, {}, {}
for i, c in ipairs(changes) do
  if answers[i][1] == 'new' or (mode == 'replay' and answers[i][1] == 'queued') then
    local ledger, stage = ledger_key(c), c[10]
    local gen = tonumber(answers[i][2]) or 0
    local seq = ''
    if c[3] == 'update' then
      -- Every field this change sets now belongs to it: an older change must not send it any more.
      seq = redis.call('HINCRBY', stage, 'seq', 1)
      -- The stage's pending updates (worker.keys.stage_key), which coalescing gathers from.
      local pairs_ = {'j' .. seq, c[1]}
      for field in string.gmatch(c[5], '[^,]+') do
        pairs_[#pairs_ + 1] = field
        pairs_[#pairs_ + 1] = seq
      end
      redis.call('HSET', stage, unpack(pairs_))
      redis.call('PEXPIRE', stage, retention)
    end
    -- Fields that would be empty or zero are left out (readers default them): less memory per change.
    local record = {'change', c[2], 'op', c[3], 'account', c[6], 'enqueued_at', now, 'lock_key', c[11], 'state', 'queued'}
    if c[3] == 'update' then
      for _, v in ipairs({'stage_id', c[4], 'fields', c[5], 'seq', seq, 'stage_key', stage}) do record[#record + 1] = v end
    end
    if c[8] ~= '' then
      record[#record + 1] = 'source'
      record[#record + 1] = c[8]
    end
    if c[13] and c[13] ~= '' then
      record[#record + 1] = 'trace'
      record[#record + 1] = c[13]
    end
    if mode == 'replay' then
      -- A replay starts the change afresh, as a new generation.
      for _, v in ipairs({'phase', '', 'attempts', 0, 'next_at', 0, 'gen', gen}) do
        record[#record + 1] = v
      end
    end
    redis.call('HSET', ledger, unpack(record))
    -- A change's entry expires only once it is done (finish.lua): while it waits, nothing expires.
    if mode == 'replay' then redis.call('PERSIST', ledger) end
    local queue = c[12]
    if not queued[queue] then
      queued[queue] = {}
      queues[#queues + 1] = queue
    end
    queued[queue][#queued[queue] + 1] = now
    queued[queue][#queued[queue] + 1] = c[1]
    written[c[6]] = (written[c[6]] or 0) + 1
    answers[i] = {'queued', gen}
  elseif answers[i][1] == 'duplicate' then
    -- A write of this call's own, so that a WAIT after it also covers the earlier write of the
    -- entry (replication is ordered): a duplicate is confirmed like a new one. A done entry is kept
    -- for another retention; one not done yet does not expire.
    local state = answers[i][2]
    if state == 'succeeded' or state == 'failed' or state == 'superseded' then
      redis.call('PEXPIRE', ledger_key(c), retention)
    else
      redis.call('HSET', ledger_key(c), 'state', state)
    end
  end
end
for _, queue in ipairs(queues) do redis.call('ZADD', queue, unpack(queued[queue])) end
if mode == 'replay' and ARGV[3] ~= '' and answers[1][1] == 'queued' then redis.call('XDEL', dlq, ARGV[3]) end
local backlog = {}
for account, count in pairs(written) do
  backlog[#backlog + 1] = account
  backlog[#backlog + 1] = redis.call('HINCRBY', pending, account, count)
end
return {answers, backlog}
