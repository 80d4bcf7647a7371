-- Batch mode (docs/contract.md: Batches), in the account's slot, by the server's clock.
--
-- 'claim': first, a batch to collect: a batch of the account whose asyncId was recorded ('sent')
-- and whose changes' leases lapsed while still on that batch's run (its worker died): those
-- changes begin a new run of this worker (fencing), hidden for one lease, their stage locks taken
-- again, no attempt counted and no rate slot taken (the polls take theirs); the worker collects
-- the batch's results and finishes each change by its job's answer. Otherwise, when more than
-- `threshold` of the account's due changes (one per stage lock, the first in queue order: updates,
-- and adds with nothing to reconcile) could be sent now, claim up to `most` of them for one batch,
-- as start.lua's go claims one change (an add's id_floor too): each takes its stage's lock, begins a new run (the fencing token), counts an attempt, is hidden
-- for one lease, and gets the batch's recovery point (batch = 'pending', batch_run = its run,
-- phase = posting, posted_at = now: the in-flight guard counts from the run's send). A change
-- start.lua would not send now is left alone: not due (a live lease), terminal, a backoff not
-- over, a request maybe in flight, out of attempts or too old, every field overtaken
-- (superseded), or its stage locked by another change. Below the threshold, or with no rate slot
-- opening within the lead, nothing is touched. A change taken over from a batch that never answered its run
-- ('pending') keeps its stage locked until that batch's wait is over (unknown_until): that batch
-- may still be applied until then.
--   KEYS: 1 account queue zset, 2 account rate hash, 3 the account's batches zset (asyncId ->
--         until when it may be collected, server ms), 4 the account's newest-claim key
--   ARGV: 1 'claim', 2 lease (ms), 3 max attempts, 4 max age (ms), 5 rate interval (µs), 6 the batch's
--         lock ttl (ms), 7 in-flight guard (ms), 8 worker id, 9 the account's ledger key prefix,
--         10 ledger retention (ms), 11 threshold, 12 the most changes, 13 how many due jobs to read,
--         14 rate window (µs), 15 the batch's wait (ms), 16 the account's batch key prefix (+ asyncId:
--         the list of a batch's job ids, in job order), 17 rate lead (µs): a slot that opens within
--         it counts as free (start.lua may take it as early; the run's 'go' waits for it)
--   Reply: {status, candidates found (a collection: the batch's size), rate wait (ms), {{job id, run,
--           attempt, dropped csv, source, enqueued at (ms), generation, change, traceparent, job index
--           in the batch}, ...}, asyncId ('' unless collecting)}; status: 'ok', 'collect', 'few' (not
--           more due jobs than the threshold: none read), 'below' (not more sendable updates than the
--           threshold), 'rate' (no slot opens within the lead)
-- 'sent': the batch's run was answered with its asyncId: the recovery point names it (batch, and
--   batch_job: the change's index in the batch), the batch is listed for collection until its wait
--   and the in-flight guard are over, and other workers' claims keep off its changes until then
--   (posted_at). Only a change's current run is written (fencing).
--   KEYS: 1 the account's batches zset, 2 this batch's job list, then each change's ledger hash
--   ARGV: 1 'sent', 2 asyncId, 3 the batch's wait (ms), 4 in-flight guard (ms), 5 lease (ms),
--         then per change: its job id, its run
--   Reply: one 1 (recorded) or 0 (stale) per change, in order.
-- 'unresolved': a batch that may still be applied (its run unanswered, its results not ready within
--   the wait): each change's stage stays locked for `hold` from now, whatever becomes of it
--   (unknown_until, which finish.lua honours). Only a change's current run is written.
--   KEYS: each change's ledger hash;  ARGV: 1 'unresolved', 2 hold (ms), then per change: its run
--   Reply: one 1 (recorded) or 0 (stale) per change, in order.
-- 'slot': take one slot of the account's rate limit for a poll of a batch, if one is free now.
--   KEYS: 1 account queue zset (unused), 2 account rate hash;  ARGV: 1 'slot', 2 rate interval (µs),
--         3 rate window (µs)
--   Reply: {0} (taken) or {wait ms} (none free now: nothing taken).
-- 'go': take the slot of a batch's run just before it is sent (the claim only checked that one was
--   free: the batch is gathered in between), and when taken, each change's in-flight guard counts
--   from now (posted_at; only a change's current run, still 'pending', is written).
--   KEYS: 1 account queue zset (unused), 2 account rate hash, then each change's ledger hash
--   ARGV: 1 'go', 2 rate interval (µs), 3 rate window (µs), then per change: its run
--   Reply: {0} (taken) or {wait ms} (none free now: nothing taken or written).
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
  for i = 3, #KEYS do
    local l = redis.call('HMGET', KEYS[i], 'run', 'state', 'batch')
    if l[1] == ARGV[i + 1] and l[2] == 'running' and l[3] == 'pending' then
      redis.call('HSET', KEYS[i], 'posted_at', now)
    end
  end
  return {0}
end

if mode == 'sent' then
  local batches, members = KEYS[1], KEYS[2]
  local async_id, wait_ms, guard_ms, lease_ms = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local recorded, jobs = {}, {}
  for i = 3, #KEYS do
    local job, run = ARGV[4 + 2 * (i - 2)], ARGV[5 + 2 * (i - 2)]
    jobs[#jobs + 1] = job
    local l = redis.call('HMGET', KEYS[i], 'run', 'state')
    if l[1] == run and l[2] == 'running' then
      redis.call('HSET', KEYS[i], 'batch', async_id, 'batch_job', i - 3, 'batch_run', run, 'posted_at', now + wait_ms)
      recorded[#recorded + 1] = 1
    else
      recorded[#recorded + 1] = 0
    end
  end
  local until_ms = now + wait_ms + guard_ms
  redis.call('ZREMRANGEBYSCORE', batches, '-inf', now)
  redis.call('ZADD', batches, until_ms, async_id)
  redis.call('PEXPIRE', batches, wait_ms + guard_ms + lease_ms)
  redis.call('DEL', members)
  redis.call('RPUSH', members, unpack(jobs))
  redis.call('PEXPIRE', members, wait_ms + guard_ms + lease_ms)
  return recorded
end

if mode == 'unresolved' then
  local hold_until, recorded = now + tonumber(ARGV[2]), {}
  for i, ledger in ipairs(KEYS) do
    local l = redis.call('HMGET', ledger, 'run', 'state', 'unknown_until')
    if l[1] == ARGV[2 + i] and l[2] == 'running' then
      redis.call('HSET', ledger, 'unknown_until', math.max(tonumber(l[3]) or 0, hold_until))
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
local ledger_prefix, retention_ms, threshold, most = ARGV[9], ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12])
local scan, window_us, wait_ms = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local batch_prefix, lead_us = ARGV[16], tonumber(ARGV[17])

local function ledger_of(job)
  return ledger_prefix .. string.sub(job, string.find(job, ':', 1, true) + 1)
end

-- Whether a lock's value names this job (any run), parsed from the right: a job id may contain '#'.
local function owned_by(owner, job)
  return string.match(owner, '^(.*)#%d+#%d+$') == job
end

-- A batch to collect: the first listed batch none of whose changes still on its run has a live lease.
local function collectable()
  redis.call('ZREMRANGEBYSCORE', batches, '-inf', now)
  for _, async_id in ipairs(redis.call('ZRANGE', batches, 0, 15)) do
    local members = redis.call('LRANGE', batch_prefix .. async_id, 0, -1)
    local lapsed, live = {}, false
    for index, job in ipairs(members) do
      local ledger = ledger_of(job)
      local l = redis.call('HMGET', ledger, 'state', 'phase', 'batch', 'batch_run', 'run', 'attempts', 'batch_dropped',
        'source', 'enqueued_at', 'gen', 'change', 'trace', 'lock_key')
      if l[1] == 'running' and l[2] == 'posting' and l[3] == async_id and l[4] == l[5] then
        if (tonumber(redis.call('ZSCORE', queue, job)) or 0) > now then
          live = true -- its worker (or a collector) still has it
          break
        end
        lapsed[#lapsed + 1] = {job, ledger, l, index - 1}
      end
    end
    if not live and #lapsed > 0 then return async_id, #members, lapsed end
    if not live then
      redis.call('ZREM', batches, async_id) -- every change of it ended, or went on without it
      redis.call('DEL', batch_prefix .. async_id)
    end
  end
  return nil
end

local async_id, size, lapsed = collectable()
if async_id then
  local claims, leased = {}, {}
  for _, item in ipairs(lapsed) do
    local job, ledger, l, index = unpack(item)
    local run = tonumber(l[5]) + 1
    local owner = redis.call('GET', l[13])
    if not owner or owned_by(owner, job) then
      redis.call('SET', l[13], job .. '#' .. run .. '#' .. (now + lock_ttl_ms), 'PX', lock_ttl_ms)
    end
    redis.call('HSET', ledger, 'run', run, 'batch_run', run, 'worker', worker_id, 'posted_at', now + wait_ms)
    leased[#leased + 1] = now + lease_ms
    leased[#leased + 1] = job
    claims[#claims + 1] = {job, run, l[6] or '0', l[7] or '', l[8] or '', l[9] or '0', l[10] or '0', l[11] or '',
      l[12] or '', index}
  end
  redis.call('ZADD', queue, unpack(leased))
  -- Collectable for as long as a batch just sent would be (should this collector die too).
  -- (Every expiry here is now + the same span: the latest is the longest.)
  redis.call('ZADD', batches, now + wait_ms + guard_ms, async_id)
  redis.call('PEXPIRE', batches, wait_ms + guard_ms + lease_ms)
  redis.call('PEXPIRE', batch_prefix .. async_id, wait_ms + guard_ms + lease_ms)
  return {'collect', size, 0, claims, async_id}
end

-- Too few due jobs of any kind: nothing to read.
if redis.call('ZCOUNT', queue, '-inf', now) <= threshold then return {'few', 0, 0, {}, ''} end
local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, scan)
local candidates, stages = {}, {}
for _, job in ipairs(due) do
  if #candidates >= most then break end
  local ledger = ledger_of(job)
  local l = redis.call('HMGET', ledger, 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
    'fields', 'posted_at', 'source', 'gen', 'change', 'stage_key', 'lock_key', 'run', 'trace', 'batch', 'batch_run',
    'unknown_until', 'id_floor')
  local state, phase, lock = l[1], l[2] or '', l[14]
  -- Due: queued, retrying, or running with its lease lapsed (a dead worker's, taken over).
  -- An add whose earlier attempt may have been applied is reconciled first (start.lua's path): never batched.
  local op_ok = l[6] == 'update' or (l[6] == 'add' and phase == '')
  local sendable = (state == 'queued' or state == 'retrying' or state == 'running') and op_ok and lock
    and not stages[lock]
    and (tonumber(l[5]) or 0) <= now and (tonumber(l[3]) or 0) < max_attempts
    and now - (tonumber(l[4]) or 0) <= max_age_ms
    and not (phase == 'posting' and (tonumber(l[9]) or 0) + guard_ms > now)
  local dropped, kept = {}, l[6] == 'add' and 1 or 0
  if sendable and l[6] == 'update' then
    local seq, fields = tonumber(l[7]), {}
    for field in string.gmatch(l[8] or '', '[^,]+') do fields[#fields + 1] = field end
    local latest = redis.call('HMGET', l[13], unpack(fields))
    for i, field in ipairs(fields) do
      if (tonumber(latest[i]) or 0) > seq then dropped[#dropped + 1] = field else kept = kept + 1 end
    end
  end
  if sendable and kept > 0 then
    -- The stage is free, or locked by an earlier run of this same change (after an unknown outcome).
    local owner = redis.call('GET', lock)
    if not owner or owned_by(owner, job) then
      stages[lock] = true
      candidates[#candidates + 1] = {job, ledger, l, table.concat(dropped, ',')}
    end
  end
end
if #candidates <= threshold then return {'below', #candidates, 0, {}, ''} end
-- A slot must open within the lead: as the account is picked that early for start.lua's claim, a
-- claim that wanted a free slot would see none and leave every turn to single calls. The run takes
-- it when it is sent ('go', after the batch is gathered), waiting for it if need be.
local rate_wait = rate_slot(rate_key, interval_us, window_us, false, lead_us)
if rate_wait > 0 then return {'rate', #candidates, rate_wait, {}, ''} end

local claims, leased, newest = {}, {}, nil
for i = 1, math.min(#candidates, most) do
  local job, ledger, l, dropped = unpack(candidates[i])
  local run, attempt = (tonumber(l[15]) or 0) + 1, (tonumber(l[3]) or 0) + 1
  if l[2] == 'posting' and l[17] == 'pending' and l[18] == l[15] then
    -- Taken over from a batch whose run was never answered: it may still be applied until its wait
    -- is over; its stage stays locked until then.
    local until_ms = (tonumber(l[9]) or 0) + guard_ms + wait_ms
    redis.call('HSET', ledger, 'unknown_until', math.max(tonumber(l[19]) or 0, until_ms))
  end
  redis.call('SET', l[14], job .. '#' .. run .. '#' .. (now + lock_ttl_ms), 'PX', lock_ttl_ms)
  redis.call('HSET', ledger, 'state', 'running', 'run', run, 'worker', worker_id, 'attempts', attempt,
    'phase', 'posting', 'posted_at', now, 'batch', 'pending', 'batch_run', run, 'batch_dropped', dropped)
  if l[6] == 'add' and not l[20] then
    -- As start.lua's go: stages at or below the newest claimed id existed before this add was first posted.
    newest = newest or redis.call('GET', newest_claim) or '0'
    redis.call('HSET', ledger, 'id_floor', newest)
  end
  redis.call('PEXPIRE', ledger, retention_ms)
  leased[#leased + 1] = now + lease_ms
  leased[#leased + 1] = job
  claims[#claims + 1] = {job, run, attempt, dropped, l[10] or '', l[4] or '0', l[11] or '0', l[12] or '', l[16] or '',
    i - 1}
end
redis.call('ZADD', queue, unpack(leased))
return {'ok', #candidates, 0, claims, ''}
