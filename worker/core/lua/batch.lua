-- Batch mode (docs/contract.md: Batches), in the account's slot, by the server's clock.
--
-- What every change of a batch shares lives once in the batch's record (a hash, keys.batch_key):
-- posted_at (when its run was sent; once answered, or collected, when its wait ends: single claims
-- keep off its changes until then), async_id (once its run was answered: the batch was accepted),
-- jobs (its job ids in job order, '\n'-separated: a change's index into its results). A change's
-- own part is in its ledger entry, written at the claim: batch_key (its batch's record), batch_run
-- (the run that holds that batch: a collection begins a new one; any other start leaves it behind,
-- and the change is no longer that batch's), batch_dropped (the fields it left out, overtaken). A
-- change on its batch's run whose record is missing was not sent yet (its claim's posted_at) or its
-- batch ended; either way, an unanswered run.
--
-- 'claim': first, a batch to collect: a batch of the account whose asyncId was recorded ('sent')
-- and whose changes' leases lapsed while still on that batch's run (its worker died): those
-- changes begin a new run of this worker (fencing), hidden for one lease, their stage locks taken
-- again, no attempt counted and no rate slot taken (the polls take theirs); the worker collects
-- the batch's results and finishes each change by its job's answer. Otherwise, when more than
-- `threshold` of the account's due changes (one per stage lock, the first in queue order: updates,
-- and adds with nothing to reconcile) could be sent now, claim up to `most` of them for one batch,
-- as start.lua's go claims one change (an add's id_floor too): each takes its stage's lock, begins
-- a new run (the fencing token), counts an attempt, is hidden for one lease, and gets its part of
-- the batch (phase = posting, posted_at = now, batch_key = the new batch's record). A change
-- start.lua would not send now is left alone: not due (a live lease), terminal, a backoff not
-- over, a request maybe in flight, one whose last send may still be applied (until unknown_until,
-- or a batch that never answered its run until its wait is over: as start.lua, it is not sent
-- again before, nor is another change of its stage), out of attempts or too old, every field
-- overtaken (superseded), or its stage locked by another change. With no rate slot that opens
-- within the lead, nothing is read;
-- below the threshold, nothing is left touched (the locks the scan took, as start.lua takes one
-- with SET NX, are given back).
--   KEYS: 1 account queue zset, 2 account rate hash, 3 the account's batches zset (batch record
--         key -> until when it may be collected, server ms), 4 the account's newest-claim key
--   ARGV: 1 'claim', 2 lease (ms), 3 max attempts, 4 max age (ms), 5 rate interval (µs), 6 the batch's
--         lock ttl (ms), 7 in-flight guard (ms), 8 worker id, 9 the account's ledger key prefix,
--         10 the record key of a new batch, 11 threshold, 12 the most changes, 13 how many due jobs
--         to read, 14 rate window (µs), 15 the batch's wait (ms), 16 rate lead (µs): a slot that
--         opens within it counts as free (start.lua may take it that early; the run's 'go' waits)
--   Reply: {status, candidates found (a collection: the batch's size), rate wait (ms), {{job id, run,
--           attempt, dropped csv, source, enqueued at (ms), generation, change, traceparent, job index
--           in the batch}, ...}, asyncId ('' unless collecting), the batch's record key ('' unless
--           claimed)}; status: 'ok', 'collect', 'few' (not more due jobs than the threshold: none
--           read), 'below' (not more sendable updates than the threshold), 'rate' (no slot opens
--           within the lead: none read); or {'kind', 0, 0, {}, '', '', {key, the kind of value it holds,
--           the kind this script keeps there}} when a key read after the claim's first write (a due
--           job's ledger hash, stage hash, batch record or lock, a listed batch's record, the
--           newest-claim key) holds another kind (another program writes into this database):
--           nothing written (but the listings of batches that ended, dropped before). Found after a
--           job's lock was taken, the scan stops before it (as at the end of the due jobs): a batch
--           of the jobs before is claimed whole, or nothing is.
-- 'go': take the slot of a batch's run just before it is sent (the claim only checked that one was
--   free: the batch is gathered in between), and when taken, write the batch's record: posted_at
--   now (each change's in-flight guard counts from then) and its jobs, kept for the ledger retention.
--   KEYS: 1 account queue zset (unused), 2 account rate hash, 3 the batch's record
--   ARGV: 1 'go', 2 rate interval (µs), 3 rate window (µs), 4 ledger retention (ms), 5 the job ids
--         in job order, '\n'-separated
--   Reply: {0} (taken) or {wait ms} (none free now: nothing taken or written).
-- 'sent': the batch's run was answered with its asyncId: in its record (and posted_at when its wait
--   ends), and the batch listed for collection until its wait and the in-flight guard are over.
--   KEYS: 1 the account's batches zset, 2 the batch's record
--   ARGV: 1 'sent', 2 asyncId, 3 the batch's wait (ms), 4 in-flight guard (ms), 5 lease (ms)
--   Reply: 1; or {key, the kind of value it holds, the kind this script keeps there} when the
--   batches zset holds another kind (nothing written: the record first would be a batch never
--   listed for collection).
-- 'ended': every change of the batch ended (or went on without it): its record and listing go.
--   KEYS: 1 the account's batches zset, 2 the batch's record;  ARGV: 1 'ended';  Reply: 1.
-- 'unresolved': a batch that may still be applied (its run unanswered, its results not ready within
--   the wait): each change's stage stays locked for `hold` from now, whatever becomes of it
--   (unknown_until, which finish.lua honours), and its stage lock is made to last as long (unless
--   another change holds it), should the worker die before it finishes the change. Only a change's
--   current run is written.
--   KEYS: each change's ledger hash;  ARGV: 1 'unresolved', 2 hold (ms), then per change: its run
--         and its job id
--   Reply: one 1 (recorded) or 0 (stale) per change, in order; or {'kind', key, the kind of value it
--   holds, the kind this script keeps there} when a ledger or lock holds another kind: nothing
--   written (every key is read before the first write).
-- 'slot': take one slot of the account's rate limit for a poll of a batch, if one is free now.
--   KEYS: 1 account queue zset (unused), 2 account rate hash;  ARGV: 1 'slot', 2 rate interval (µs),
--         3 rate window (µs)
--   Reply: {0} (taken) or {wait ms} (none free now: nothing taken).
--#include locks.lua
--#include kinds.lua

local mode = ARGV[1]
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now = math.floor(now_us / 1000)

-- The account's rate limit, exactly as start.lua keeps it (GCRA in µs; keep the two the same): the
-- next slot is a whole interval after this send, however early (the window) or late.
-- With `take` false, only whether one opens within `lead_us` (nothing written).
local function rate_slot(rate_key, interval_us, window_us, take, lead_us)
  local rate = redis.call('HMGET', rate_key, 'tat', 'pause_until')
  local tat = tonumber(rate[1]) or 0
  local pause_until_us = (tonumber(rate[2]) or 0) * 1000
  local wait_us = math.max(tat - window_us - (lead_us or 0), pause_until_us) - now_us
  if wait_us > 0 then return math.ceil(wait_us / 1000) end
  if not take then return 0 end
  local floor_us = interval_us >= window_us and now_us + window_us or now_us
  if tat < floor_us then tat = floor_us end
  redis.call('HSET', rate_key, 'tat', string.format('%d', tat + interval_us))
  return 0
end

if mode == 'slot' then
  return {rate_slot(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), true)}
end

if mode == 'go' then
  local wait = rate_slot(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), true)
  if wait > 0 then return {wait} end
  redis.call('HSET', KEYS[3], 'posted_at', now, 'jobs', ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return {0}
end

if mode == 'sent' then
  local batches, record = KEYS[1], KEYS[2]
  local wait_ms, guard_ms, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local refused = mismatch({[batches] = 'zset'})
  if refused then return refused end
  redis.call('HSET', record, 'async_id', ARGV[2], 'posted_at', now + wait_ms)
  redis.call('ZREMRANGEBYSCORE', batches, '-inf', now)
  redis.call('ZADD', batches, now + wait_ms + guard_ms, record)
  redis.call('PEXPIRE', batches, wait_ms + guard_ms + lease_ms)
  return 1
end

if mode == 'ended' then
  redis.call('ZREM', KEYS[1], KEYS[2])
  redis.call('DEL', KEYS[2])
  return 1
end

if mode == 'unresolved' then
  local hold_until, recorded, reads = now + tonumber(ARGV[2]), {}, {}
  for i, ledger in ipairs(KEYS) do
    reads[i] = read('hash', 'HMGET', ledger, 'run', 'state', 'unknown_until', 'lock_key')
    local l = reads[i]
    if l and l[1] == ARGV[1 + 2 * i] and l[2] == 'running' and l[4] then read('string', 'GET', l[4]) end
    if foreign then return {'kind', unpack(foreign)} end
  end
  for i, ledger in ipairs(KEYS) do
    local run, job, l = ARGV[1 + 2 * i], ARGV[2 + 2 * i], reads[i]
    if l[1] == run and l[2] == 'running' then
      local until_ms = math.max(tonumber(l[3]) or 0, hold_until)
      redis.call('HSET', ledger, 'unknown_until', until_ms)
      -- The lock of the batch's claim may end sooner (counted from the claim, not the send).
      take_lock(l[4], job, run, until_ms)
      recorded[i] = 1
    else
      recorded[i] = 0
    end
  end
  return recorded
end

local queue, rate_key, batches, newest_claim = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local lease_ms, max_attempts, max_age_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local interval_us, lock_ttl_ms, guard_ms, worker_id = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local ledger_prefix, new_record, threshold, most = ARGV[9], ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12])
local scan, window_us, wait_ms = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local lead_us = tonumber(ARGV[16])

local function ledger_of(job)
  return ledger_prefix .. string.sub(job, string.find(job, ':', 1, true) + 1)
end

-- A batch to collect: the first listed batch none of whose changes still on its run has a live lease.
-- Its changes' keys are read before any of them is written (nil: one holds another kind, `foreign`).
local function collectable()
  redis.call('ZREMRANGEBYSCORE', batches, '-inf', now)
  for _, record in ipairs(redis.call('ZRANGE', batches, 0, 15)) do
    local b = read('hash', 'HMGET', record, 'async_id', 'jobs')
    if not b then return nil end
    local lapsed, live, size = {}, false, 0
    for job in string.gmatch(b[2] or '', '[^\n]+') do
      size = size + 1
      local ledger = ledger_of(job)
      local l = read('hash', 'HMGET', ledger, 'state', 'phase', 'batch_key', 'batch_run', 'run', 'attempts',
        'batch_dropped', 'source', 'enqueued_at', 'gen', 'change', 'trace', 'lock_key')
      if not l then return nil end
      if l[1] == 'running' and l[2] == 'posting' and l[3] == record and l[4] == l[5] then
        if (tonumber(redis.call('ZSCORE', queue, job)) or 0) > now then
          live = true -- its worker (or a collector) still has it
          break
        end
        if read('string', 'GET', l[13]) == nil then return nil end -- its lock, taken again below
        lapsed[#lapsed + 1] = {job, ledger, l, size - 1}
      end
    end
    if not live and #lapsed > 0 then return record, b[1], size, lapsed end
    if not live then
      redis.call('ZREM', batches, record) -- every change of it ended, or went on without it
      redis.call('DEL', record)
    end
  end
  return nil
end

local record, async_id, size, lapsed = collectable()
if record then
  local claims, leased = {}, {}
  for _, item in ipairs(lapsed) do
    local job, ledger, l, index = unpack(item)
    local run = tonumber(l[5]) + 1
    take_lock(l[13], job, run, now + lock_ttl_ms)
    redis.call('HSET', ledger, 'run', run, 'batch_run', run, 'worker', worker_id)
    leased[#leased + 1] = now + lease_ms
    leased[#leased + 1] = job
    claims[#claims + 1] = {job, run, l[6] or '0', l[7] or '', l[8] or '', l[9] or '0', l[10] or '0', l[11] or '',
      l[12] or '', index}
  end
  redis.call('ZADD', queue, unpack(leased))
  -- Single claims keep off it, and it is collectable, for as long as a batch just sent (should this
  -- collector die too).
  redis.call('HSET', record, 'posted_at', now + wait_ms)
  redis.call('ZADD', batches, now + wait_ms + guard_ms, record)
  redis.call('PEXPIRE', batches, wait_ms + guard_ms + lease_ms)
  return {'collect', size, 0, claims, async_id, record}
end
-- The expired listings collectable() dropped are the only writes before.
if foreign then return {'kind', 0, 0, {}, '', '', foreign} end

-- Too few due jobs of any kind: nothing to read.
if redis.call('ZCOUNT', queue, '-inf', now) <= threshold then return {'few', 0, 0, {}, '', ''} end
-- A slot must open within the lead: the account is picked that early for start.lua's claim, and a
-- claim that wanted a free slot would leave every such turn to single calls. The run takes it when
-- it is sent ('go', after the batch is gathered), waiting for it if need be.
local rate_wait = rate_slot(rate_key, interval_us, window_us, false, lead_us)
if rate_wait > 0 then return {'rate', 0, rate_wait, {}, '', ''} end
local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, scan)
-- When a change in flight was sent last, and whether by a batch's run never answered: one still on
-- its batch's run (batch_run) reads them from the batch's record (none yet: sent at the claim).
local function in_flight(l)
  if not l[17] or l[18] ~= l[15] then return tonumber(l[9]) or 0, false end
  local b = read('hash', 'HMGET', l[17], 'posted_at', 'async_id')
  if not b then return 0, false end
  return tonumber(b[1]) or tonumber(l[9]) or 0, not b[2]
end

local candidates, stages = {}, {}
for _, job in ipairs(due) do
  if #candidates >= most then break end
  local ledger = ledger_of(job)
  local l = read('hash', 'HMGET', ledger, 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
    'fields', 'posted_at', 'source', 'gen', 'change', 'stage_key', 'lock_key', 'run', 'trace', 'batch_key',
    'batch_run', 'unknown_until', 'id_floor')
  if not l then break end -- another kind of value: the scan stops before it (`foreign`)
  local state, phase, lock = l[1], l[2] or '', l[14]
  local posted_at, unanswered = 0, false
  if phase == 'posting' then posted_at, unanswered = in_flight(l) end
  if foreign then break end
  -- Until when its last send may still be applied (as start.lua: a batch whose run was never answered
  -- may be until its wait is over): till then it is not sent again, since it would carry its stage's
  -- newer updates and that late commit overwrite them (start.lua decides it if it sends nothing).
  local held_until = tonumber(l[19]) or 0
  if unanswered then held_until = math.max(held_until, posted_at + guard_ms + wait_ms) end
  if held_until > now and lock then stages[lock] = true end
  -- Due: queued, retrying, or running with its lease lapsed (a dead worker's, taken over).
  -- An add whose earlier attempt may have been applied is reconciled first (start.lua's path): never batched.
  local op_ok = l[6] == 'update' or (l[6] == 'add' and phase == '')
  local sendable = (state == 'queued' or state == 'retrying' or state == 'running') and op_ok and lock
    and not stages[lock]
    and (tonumber(l[5]) or 0) <= now and (tonumber(l[3]) or 0) < max_attempts
    and now - (tonumber(l[4]) or 0) <= max_age_ms
    and not (phase == 'posting' and posted_at + guard_ms > now) and held_until <= now
  local dropped, kept = {}, l[6] == 'add' and 1 or 0
  if sendable and l[6] == 'update' then
    local seq, fields = tonumber(l[7]), {}
    for field in string.gmatch(l[8] or '', '[^,]+') do fields[#fields + 1] = field end
    local latest = read('hash', 'HMGET', l[13], unpack(fields)) or {}
    for i, field in ipairs(fields) do
      if (tonumber(latest[i]) or 0) > seq then dropped[#dropped + 1] = field else kept = kept + 1 end
    end
  end
  if foreign then break end
  if sendable and kept > 0 then
    -- The stage is free (taken now: given back if no batch is claimed), or locked by an earlier run
    -- of this same change (after an unknown outcome: taken over if one is).
    local value = lock_value(job, (tonumber(l[15]) or 0) + 1, now + lock_ttl_ms)
    local taken = redis.call('SET', lock, value, 'PX', lock_ttl_ms, 'NX')
    local owner = not taken and read('string', 'GET', lock)
    if owner == nil then break end
    if taken or owned_by(owner, job) then
      stages[lock] = true
      -- Taken over from a batch whose run was never answered (its wait is over by now): recorded.
      local hold = unanswered and held_until or false
      candidates[#candidates + 1] = {job, ledger, l, table.concat(dropped, ','), hold, not taken and value}
    end
  end
end
-- As start.lua's go: stages at or below the newest claimed id existed before an add was first
-- posted; read before anything is claimed. A scan stopped before a key of another kind (`foreign`)
-- claims what it found, if a batch, and otherwise answers the key.
local newest = false
if #candidates > threshold then
  for _, c in ipairs(candidates) do
    if c[3][6] == 'add' and not c[3][20] then
      newest = read('string', 'GET', newest_claim)
      break
    end
  end
end
if #candidates <= threshold or newest == nil then
  for _, c in ipairs(candidates) do
    if not c[6] then redis.call('DEL', c[3][14]) end
  end
  if foreign then return {'kind', 0, 0, {}, '', '', foreign} end
  return {'below', #candidates, 0, {}, '', ''}
end

local claims, leased = {}, {}
for i = 1, #candidates do
  local job, ledger, l, dropped, hold, retaken = unpack(candidates[i])
  local run, attempt = (tonumber(l[15]) or 0) + 1, (tonumber(l[3]) or 0) + 1
  if retaken then redis.call('SET', l[14], retaken, 'PX', lock_ttl_ms) end
  -- The change's own part of the batch (the rest is its record's, written once for all at 'go').
  local fields = {'state', 'running', 'run', run, 'worker', worker_id, 'attempts', attempt, 'phase', 'posting',
    'posted_at', now, 'batch_key', new_record, 'batch_run', run, 'batch_dropped', dropped}
  if hold then fields[#fields + 1], fields[#fields + 2] = 'unknown_until', hold end
  if l[6] == 'add' and not l[20] then fields[#fields + 1], fields[#fields + 2] = 'id_floor', newest or '0' end
  redis.call('HSET', ledger, unpack(fields))
  leased[#leased + 1] = now + lease_ms
  leased[#leased + 1] = job
  claims[#claims + 1] = {job, run, attempt, dropped, l[10] or '', l[4] or '0', l[11] or '0', l[12] or '', l[16] or '',
    i - 1}
end
redis.call('ZADD', queue, unpack(leased))
return {'ok', #candidates, 0, claims, '', new_record}
