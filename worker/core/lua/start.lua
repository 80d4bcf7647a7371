-- Claim changes of one account and decide for each whether it may talk to iVvy now, in one step,
-- by the server's clock (no client clock decides anything). Given a job id, that job; given '',
-- the account's due jobs in due order until `wanted` of them run: a job is read only when it is
-- due, and one that could be sent waits untouched in the queue while the account's rate limiter
-- has no slot that opens within the lead (the worker picks the account again when it has one).
-- KEYS: 1 account queue zset, 2 account rate hash, 3 account newest-claim key
-- ARGV: 1 job id or '' (the account's next due jobs), 2 lease (ms), 3 max attempts, 4 max age (ms),
--       5 rate interval (µs), 6 lock ttl (ms), 7 in-flight guard (ms), 8 worker id,
--       9 the account's ledger key prefix (worker.keys: prefix .. idempotency key), 10 jitter (ms)
--       for lock waits, 11 how many jobs may run (a worker's free slots), 12 rate window (µs):
--       slots that fall due within it are taken now (a batch at high rates), 13 LEADSTAGE_BATCH_WAIT
--       (ms): how long a batch that never answered its run may still be applied (batch.lua),
--       14 rate lead (µs): a slot that opens at most this long from now is taken now, at its opening
-- The stage hash and lock key of a change are read from its ledger entry (stage_key, lock_key:
-- named by worker.keys at enqueue, in the account's slot). A lock's value is 'job#run#expires at
-- (server ms)', so that finish.lua can put back a lock it took by mistake (GETDEL) as it was.
-- Reply (worker.core.replies parses it): {account next (server ms, -1: its queue is empty),
--   rate reason ('' | 'rate' | 'paused': why the claim stopped), rate wait (ms), decisions}, the
--   decisions a flat array of 15 items each: decision, wait ms, wait reason, run, attempt, previous phase,
--   dropped csv, source, enqueued at (ms), generation, change, state, job id, traceparent, send in
--   (µs: how long after this call, by the server's clock, go's request may leave: its slot opens then)}
--   decision: skip | missing | done | wait | superseded | exhausted | go (worker.core.states.Decision).
--   superseded, exhausted and go start a new run (the fencing token) and hide the job for one
--   lease (missing too, until lost.lua reports it); go also counts an attempt, takes a rate-limit
--   slot and the lock. With a job id there is always exactly one decision; without, 'wait' is never
--   one (the job is put back for later).
--   Or {-1, '', 0, {}, {key, the kind of value it holds, the kind this script keeps there}} when a
--   key the first job considered reads after the call's first write (its ledger hash, stage hash,
--   batch record, lock or the newest-claim key) holds another kind (another program writes into
--   this database): nothing written. Found at a later job, the claim stops before it (that job
--   untouched, the jobs before it claimed whole) and the next claim starts with it.
local queue, rate_key, newest_claim = KEYS[1], KEYS[2], KEYS[3]
local wanted, lease_ms, max_attempts, max_age_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local interval_us, lock_ttl_ms, guard_ms, worker_id = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local ledger_prefix, jitter_ms = ARGV[9], tonumber(ARGV[10])
local slots, window_us, batch_wait_ms = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local lead_us = tonumber(ARGV[14])

--#include locks.lua
--#include kinds.lua

local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now = math.floor(now_us / 1000)
local rate = redis.call('HMGET', rate_key, 'tat', 'pause_until')
local tat0 = tonumber(rate[1]) or 0
local tat = tat0
local pause_until_us = (tonumber(rate[2]) or 0) * 1000

local decisions, leased, newest = {}, {}, nil
-- The soonest score given to a job this call (its lease, or its time to look again).
local soonest = -1
local function rescored(at)
  if soonest < 0 or at < soonest then soonest = at end
end
local rate_reason, rate_wait = '', 0
-- A read refused (WRONGTYPE) after the writes of the jobs before would leave them without their
-- leases in the queue: each key a job reads after the call's first write is read by `read`
-- (kinds.lua), which answers nil for another kind of value (then the claim stops before the job).
local function decided(decision, job, wait_ms, reason, run, attempt, phase, dropped, l, send_us)
  l = l or {}
  for _, v in ipairs({decision, wait_ms or 0, reason or '', run or 0, attempt or 0, phase or '', dropped or '',
    l[10] or '', l[4] or '0', l[11] or '0', l[12] or '', l[1] or '', job, l[16] or '', send_us or 0}) do
    decisions[#decisions + 1] = v
  end
  return true
end

-- One due job: true when it was decided about (a decision in the reply), false when it was put back
-- for later (the claim goes on to the next), nil when the rate limit has no free slot (it stops).
local function consider(job)
  local ledger = ledger_prefix .. string.sub(job, string.find(job, ':', 1, true) + 1)
  local l = read('hash', 'HMGET', ledger, 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
    'fields', 'posted_at', 'source', 'gen', 'change', 'stage_key', 'lock_key', 'run', 'trace', 'id_floor',
    'batch_key', 'batch_run', 'unknown_until')
  if not l then return nil end
  local state, phase = l[1], l[2] or ''
  local attempts, run = tonumber(l[3]) or 0, tonumber(l[15]) or 0
  if not state then
    -- Reported by lost.lua, which removes it from the queue; hidden for one lease meanwhile, so that
    -- a worker that dies before reporting it leaves it for another.
    redis.call('ZADD', queue, now + lease_ms, job)
    rescored(now + lease_ms)
    return decided('missing', job)
  end
  if state == 'succeeded' or state == 'failed' or state == 'superseded' then
    redis.call('ZREM', queue, job)
    return decided('done', job, 0, '', 0, 0, '', '', l)
  end

  local function later(ms, reason)
    redis.call('ZADD', queue, now + ms, job)
    rescored(now + ms)
    -- No expiry until it is done, however long it is held back (an entry of an older version
    -- found with one loses it).
    redis.call('PERSIST', ledger)
    if wanted ~= '' then return decided('wait', job, ms, reason) end
    return false
  end
  local function decide(decision, dropped, fields, send_us)
    run = run + 1
    redis.call('HSET', ledger, 'state', 'running', 'run', run, 'worker', worker_id, unpack(fields or {}))
    leased[#leased + 1] = now + lease_ms
    leased[#leased + 1] = job
    rescored(now + lease_ms)
    return decided(decision, job, 0, '', run, attempts, phase, dropped, l, send_us)
  end

  local next_at = tonumber(l[5]) or 0
  if next_at > now then return later(next_at - now, 'backoff') end
  -- A change still on its batch's run (batch.lua): when it was sent, and whether that run was
  -- answered, are its batch's record's (no record: not sent yet, at its claim's posted_at).
  local posted_at, unanswered, recorded = tonumber(l[9]) or 0, false, false
  if phase == 'posting' and l[18] and l[19] == l[15] then
    local b = read('hash', 'HMGET', l[18], 'posted_at', 'async_id')
    if not b then return nil end
    posted_at, unanswered, recorded = tonumber(b[1]) or posted_at, not b[2], b[2] ~= false
  end
  -- Until when this change's last send may still be applied by iVvy (finish.lua after a request of
  -- unknown outcome, batch.lua's 'unresolved'; a batch whose run was never answered: until its wait
  -- is over, counted from its run's send).
  local held_until = tonumber(l[20]) or 0
  -- Whatever it is decided now, the stage stays locked until then (finish.lua honours it).
  local hold = {}
  if unanswered then
    held_until = math.max(held_until, posted_at + guard_ms + batch_wait_ms)
    hold = {'unknown_until', held_until}
  end
  if phase == 'posting' then
    -- A worker may still be waiting for iVvy's answer to its POST: let that request time out first,
    -- counted from the recovery point written just before it.
    local guard_end = posted_at + guard_ms
    if guard_end > now then
      -- A batch whose asyncId was recorded is collected by batch.lua's claim once its leases lapse
      -- (not resent): look again soon, so that its jobs stay due for that claim.
      return later(recorded and math.min(guard_end - now, 1000) or guard_end - now, 'in_flight')
    end
  end

  local dropped = {}
  if l[6] == 'update' then
    local seq, fields, kept = tonumber(l[7]), {}, 0
    for field in string.gmatch(l[8], '[^,]+') do fields[#fields + 1] = field end
    local latest = read('hash', 'HMGET', l[13], unpack(fields))
    if not latest then return nil end
    for i, field in ipairs(fields) do
      if (tonumber(latest[i]) or 0) > seq then dropped[#dropped + 1] = field else kept = kept + 1 end
    end
    if kept == 0 then return decide('superseded', table.concat(dropped, ','), hold) end
  end

  -- While its last send may still land, the change does not go either: its resend carries the
  -- stage's newer due updates, which that late commit would overwrite. Superseded or out of attempts
  -- it sends nothing and is decided at once (the stage stays locked until then: finish.lua); an add
  -- is reconciled (exhausted too), which must come after whatever may still create its stage.
  local exhausted = attempts >= max_attempts or now - tonumber(l[4]) > max_age_ms
  if held_until > now and (l[6] == 'add' or not exhausted) then
    -- Its stage stays locked meanwhile, also when the lock its last send took ends first (a batch's
    -- lasts from its claim; a worker that died between 'unresolved' and its finish).
    if read('string', 'GET', l[14]) == nil then return nil end
    take_lock(l[14], job, run, held_until)
    return later(held_until - now, 'in_flight')
  end
  if not exhausted then
    -- The account's rate limit, shared by every worker: GCRA with a burst of one request (and of
    -- the slots due within the window), in µs. A slot is reserved at most the lead ahead (a pause
    -- not at all): while none opens within it the change is left as it is.
    local wait_us = math.max(tat - window_us - lead_us, pause_until_us) - now_us
    if wait_us > 0 then
      local reason = pause_until_us > now_us and 'paused' or 'rate'
      if wanted ~= '' then return later(math.ceil(wait_us / 1000), reason) end
      rate_reason, rate_wait = reason, math.ceil(wait_us / 1000)
      return nil
    end
  end

  -- An add posted afresh records the newest claimed id (below), read before the lock is written.
  local floor = not exhausted and l[6] == 'add' and phase ~= 'posting' and phase ~= 'unknown' and not l[17]
  if floor and not newest then
    newest = read('string', 'GET', newest_claim)
    if newest == nil then return nil end
    newest = newest or '0'
  end
  -- The lock names the job, its run and its expiry; an older run of this same job (kept after an
  -- unknown outcome) is ours to take over.
  local lock = l[14]
  -- An exhausted change decided while its last send may still land keeps the stage that long.
  local lock_until = math.max(now + lock_ttl_ms, exhausted and held_until or 0)
  local value = lock_value(job, run + 1, lock_until)
  if not redis.call('SET', lock, value, 'PXAT', lock_until, 'NX') then
    local owner = read('string', 'GET', lock)
    if owner == nil then return nil end
    if not owned_by(owner, job) then
      -- The holder usually finishes within one request: look again soon, not at the lock's expiry.
      return later(math.min(redis.call('PTTL', lock), 20) + jitter_ms, 'locked')
    end
    redis.call('SET', lock, value, 'PXAT', lock_until)
  end
  if exhausted then return decide('exhausted', '', hold) end

  -- The request leaves when its slot opens (send_us from now: a claim within the lead waits
  -- locally), or at once when the claim is late; the next slot is a whole interval after that
  -- send, however early (the window) or late the claim: two sends are never closer than one
  -- interval, so a server counting requests over any sliding second sees at most the limit. A claim
  -- made within the lead sends exactly at its slot, so the lateness of waking up for it (the
  -- schedule's pick and this call's round trips) does not carry over to the slots after it. Above
  -- one request per window, the slots due within it go together.
  local send_us = math.max(tat - window_us - now_us, 0)
  local floor_us = interval_us >= window_us and now_us + window_us or now_us
  if tat < floor_us then tat = floor_us end
  tat = tat + interval_us
  attempts = attempts + 1
  local recovery = {'attempts', attempts, unpack(hold)}
  if not (l[6] == 'add' and (phase == 'posting' or phase == 'unknown')) then
    -- The recovery point: the POST follows at its slot (the in-flight guard counts from then). An
    -- add of unknown outcome is reconciled first and writes its recovery point just before its own
    -- POST (post.lua).
    for _, v in ipairs({'phase', 'posting', 'posted_at', now + math.ceil(send_us / 1000)}) do
      recovery[#recovery + 1] = v
    end
    if floor then
      -- Stages at or below the newest claimed id existed before this add was first posted.
      recovery[#recovery + 1] = 'id_floor'
      recovery[#recovery + 1] = newest
    end
  end
  return decide('go', table.concat(dropped, ','), recovery, send_us)
end

local head = -1
if wanted ~= '' then
  local score = redis.call('ZSCORE', queue, wanted)
  if not score or tonumber(score) > now then decided('skip', wanted) else consider(wanted) end
  if foreign then return {-1, '', 0, {}, foreign} end
else
  -- A bounded number of due jobs per call, so that one call stays short whatever the backlog; one
  -- more is read, so that the queue's head after the claim is known without another read.
  local due = redis.call('ZRANGEBYSCORE', queue, '-inf', '+inf', 'WITHSCORES', 'LIMIT', 0, slots + 17)
  local i = 1
  while due[i] and tonumber(due[i + 1]) <= now and #leased < 2 * slots and i < 2 * (slots + 16) do
    if consider(due[i]) == nil then break end
    i = i + 2
  end
  -- Every job considered before wrote something: the first one considered, nothing is written.
  if foreign and i == 1 then return {-1, '', 0, {}, foreign} end
  -- The queue's head now: the first job not touched (every other one comes after it), or one touched.
  head = due[i + 1] and tonumber(due[i + 1]) or -1
  if soonest >= 0 and (head < 0 or soonest < head) then head = soonest end
  if head >= 0 then head = math.max(head, math.ceil(math.max(tat - window_us - lead_us, pause_until_us) / 1000)) end
end
if #leased > 0 then redis.call('ZADD', queue, unpack(leased)) end
if tat ~= tat0 then redis.call('HSET', rate_key, 'tat', string.format('%d', tat)) end
return {head, rate_reason, rate_wait, decisions}
