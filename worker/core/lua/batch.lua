-- Batch mode (docs/contract.md: Batches), in the account's slot, by the server's clock.
--
-- 'claim': when more than `threshold` of the account's due updates (one per stage: the first in queue order)
-- could be sent now, claim up to `most` of them for one batch, as start.lua's go claims one change:
-- each takes its stage's lock, begins a new run (the fencing token), counts an attempt, is hidden
-- for one lease, and gets the batch's recovery point (batch = 'pending', phase = posting, and a
-- posted_at that keeps other workers off it until the batch's wait is over); the whole batch takes
-- one slot of the account's rate limit. A change start.lua would not send now is left alone: not
-- due (a live lease), terminal, a backoff not over, a request maybe in flight, out of attempts or
-- too old, every field overtaken (superseded), or its stage locked by another change. Below the
-- threshold, or with no free rate slot, nothing is touched.
--   KEYS: 1 account queue zset, 2 account rate hash
--   ARGV: 1 'claim', 2 lease (ms), 3 max attempts, 4 max age (ms), 5 rate interval (µs), 6 the batch's
--         lock ttl (ms), 7 in-flight guard (ms), 8 worker id, 9 the account's ledger key prefix,
--         10 ledger retention (ms), 11 threshold, 12 the most changes, 13 how many due jobs to read,
--         14 rate window (µs), 15 the batch's wait (ms)
--   Reply: {status, candidates found, rate wait (ms), {{job id, run, attempt, dropped csv, source,
--           enqueued at (ms), generation, change, traceparent}, ...}}; status: 'ok', 'few' (not more
--           due jobs than the threshold: none read), 'below' (not more sendable updates than the
--           threshold), 'rate' (no free slot)
-- 'sent': the batch's run was answered with its asyncId: the recovery point names it, and the wait
--   for its results starts now. Only a change's current run is written (fencing).
--   KEYS: each change's ledger hash;  ARGV: 1 'sent', 2 asyncId, 3 the batch's wait (ms),
--         then per change: its run
--   Reply: one 1 (recorded) or 0 (stale) per change, in order.
-- 'slot': take one slot of the account's rate limit for a poll of a batch, if one is free now.
--   KEYS: 1 account queue zset (unused), 2 account rate hash;  ARGV: 1 'slot', 2 rate interval (µs),
--         3 rate window (µs)
--   Reply: {0} (taken) or {wait ms} (none free now: nothing taken).
local mode = ARGV[1]
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now = math.floor(now_us / 1000)

-- The account's rate limit, exactly as start.lua keeps it (GCRA in µs; keep the two the same): the
-- next slot is a whole interval after this send, however early (the window) or late.
local function rate_slot(rate_key, interval_us, window_us)
  local rate = redis.call('HMGET', rate_key, 'tat', 'pause_until')
  local tat = tonumber(rate[1]) or 0
  local pause_until_us = (tonumber(rate[2]) or 0) * 1000
  local wait_us = math.max(tat - window_us, pause_until_us) - now_us
  if wait_us > 0 then return math.ceil(wait_us / 1000) end
  local floor_us = interval_us >= window_us and now_us + window_us or now_us
  if tat < floor_us then tat = floor_us end
  redis.call('HSET', rate_key, 'tat', string.format('%d', tat + interval_us))
  return 0
end

if mode == 'slot' then
  return {rate_slot(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))}
end

if mode == 'sent' then
  local async_id, wait_ms = ARGV[2], tonumber(ARGV[3])
  local recorded = {}
  for i, ledger in ipairs(KEYS) do
    local l = redis.call('HMGET', ledger, 'run', 'state')
    if l[1] == ARGV[3 + i] and l[2] == 'running' then
      redis.call('HSET', ledger, 'batch', async_id, 'posted_at', now + wait_ms)
      recorded[i] = 1
    else
      recorded[i] = 0
    end
  end
  return recorded
end

local queue, rate_key = KEYS[1], KEYS[2]
local lease_ms, max_attempts, max_age_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local interval_us, lock_ttl_ms, guard_ms, worker_id = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local ledger_prefix, retention_ms, threshold, most = ARGV[9], ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12])
local scan, window_us, wait_ms = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])

-- Too few due jobs of any kind: nothing to read.
if redis.call('ZCOUNT', queue, '-inf', now) <= threshold then return {'few', 0, 0, {}} end
local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, scan)
local candidates, stages = {}, {}
for _, job in ipairs(due) do
  if #candidates >= most then break end
  local ledger = ledger_prefix .. string.sub(job, string.find(job, ':', 1, true) + 1)
  local l = redis.call('HMGET', ledger, 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
    'fields', 'posted_at', 'source', 'gen', 'change', 'stage_key', 'lock_key', 'run', 'trace')
  local state, phase, lock = l[1], l[2] or '', l[14]
  -- Due: queued, retrying, or running with its lease lapsed (a dead worker's, taken over).
  local sendable = (state == 'queued' or state == 'retrying' or state == 'running') and l[6] == 'update' and lock
    and not stages[lock]
    and (tonumber(l[5]) or 0) <= now and (tonumber(l[3]) or 0) < max_attempts
    and now - (tonumber(l[4]) or 0) <= max_age_ms
    and not (phase == 'posting' and (tonumber(l[9]) or 0) + guard_ms > now)
  local dropped, kept = {}, 0
  if sendable then
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
    if not owner or string.sub(owner, 1, #job + 1) == job .. '#' then
      stages[lock] = true
      candidates[#candidates + 1] = {job, ledger, l, table.concat(dropped, ',')}
    end
  end
end
if #candidates <= threshold then return {'below', #candidates, 0, {}} end
local rate_wait = rate_slot(rate_key, interval_us, window_us)
if rate_wait > 0 then return {'rate', #candidates, rate_wait, {}} end

local claims, leased = {}, {}
for i = 1, math.min(#candidates, most) do
  local job, ledger, l, dropped = unpack(candidates[i])
  local run, attempt = (tonumber(l[15]) or 0) + 1, (tonumber(l[3]) or 0) + 1
  redis.call('SET', l[14], job .. '#' .. run .. '#' .. (now + lock_ttl_ms), 'PX', lock_ttl_ms)
  redis.call('HSET', ledger, 'state', 'running', 'run', run, 'worker', worker_id, 'attempts', attempt,
    'phase', 'posting', 'posted_at', now + wait_ms, 'batch', 'pending')
  redis.call('PEXPIRE', ledger, retention_ms)
  leased[#leased + 1] = now + lease_ms
  leased[#leased + 1] = job
  claims[#claims + 1] = {job, run, attempt, dropped, l[10] or '', l[4] or '0', l[11] or '0', l[12] or '', l[16] or ''}
end
redis.call('ZADD', queue, unpack(leased))
return {'ok', #candidates, 0, claims}
