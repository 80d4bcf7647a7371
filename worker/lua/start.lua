-- Start a job: claim it from the queue and decide whether it may talk to iVvy now, in one step,
-- by the server's clock (no client clock decides anything).
-- KEYS: 1 queue zset, 2 ledger hash, 3 account rate hash, 4 account newest-claim key
-- ARGV: 1 job id, 2 lease (ms), 3 max attempts, 4 max age (ms), 5 rate interval (µs),
--       6 lock ttl (ms), 7 in-flight guard (ms), 8 worker id, 9 stage key prefix,
--       10 lock key prefix, 11 jitter (ms) for lock waits, 12 how late (µs) a job may wake for its
--       reserved rate-limit slot, 13 ledger retention (ms)
-- The stage hash and lock key are built from the prefixes and the ledger's account, stage id and
-- lock subject (worker.keys builds the same names).
-- Reply, always 12 items (worker.ledger parses it into a Start):
--   {decision, wait ms, wait reason, run, attempt, previous phase, dropped csv, source,
--    enqueued at (ms), generation, change, state}
--   decision: skip | missing | done | wait | superseded | exhausted | go (worker.states.Decision).
--   superseded, exhausted and go start a new run (the fencing token) and hide the job for one
--   lease; go also counts an attempt and takes the stage lock.
local queue, ledger, rate_key, newest_claim = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job, lease_ms, max_attempts, max_age_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local interval_us, lock_ttl_ms, guard_ms, worker_id = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8]
local stage_prefix, lock_prefix, jitter_ms = ARGV[9], ARGV[10], tonumber(ARGV[11])
local grace_us, retention_ms = tonumber(ARGV[12]), ARGV[13]

local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now = math.floor(now_us / 1000)

local function reply(decision, wait_ms, reason, run, attempt, phase, dropped, l)
  l = l or {}
  return {decision, wait_ms or 0, reason or '', run or 0, attempt or 0, phase or '', dropped or '',
    l[10] or '', l[4] or '0', l[11] or '0', l[12] or '', l[1] or ''}
end

local score = redis.call('ZSCORE', queue, job)
if not score or tonumber(score) > now then return reply('skip') end

local l = redis.call('HMGET', ledger, 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
  'fields', 'posted_at', 'source', 'gen', 'change', 'account', 'stage_id', 'lock', 'slot', 'run')
local state, phase = l[1], l[2] or ''
local attempts, run = tonumber(l[3]) or 0, tonumber(l[17]) or 0
local account, stage_id, subject = l[13], l[14], l[15]
if not state or state == 'succeeded' or state == 'failed' or state == 'superseded' then
  redis.call('ZREM', queue, job)
  if not state then return reply('missing') end
  return reply('done', 0, '', 0, 0, '', '', l)
end
-- Touched, so kept: a change held back for a long time must not outlive its ledger entry.
redis.call('PEXPIRE', ledger, retention_ms)

local function later(ms, reason)
  redis.call('ZADD', queue, now + ms, job)
  return reply('wait', ms, reason)
end
local function decide(decision, dropped)
  run = run + 1
  redis.call('HSET', ledger, 'run', run, 'worker', worker_id)
  redis.call('ZADD', queue, now + lease_ms, job)
  return reply(decision, 0, '', run, attempts, phase, dropped, l)
end

local next_at = tonumber(l[5]) or 0
if next_at > now then return later(next_at - now, 'backoff') end
if phase == 'posting' then
  -- A worker may still be waiting for iVvy's answer to its POST: let that request time out first,
  -- counted from the recovery point written just before it.
  local guard_end = (tonumber(l[9]) or 0) + guard_ms
  if guard_end > now then return later(guard_end - now, 'in_flight') end
end

local dropped = {}
if l[6] == 'update' then
  local seq, fields, kept = tonumber(l[7]), {}, 0
  for field in string.gmatch(l[8], '[^,]+') do fields[#fields + 1] = field end
  local latest = redis.call('HMGET', stage_prefix .. account .. ':' .. stage_id, unpack(fields))
  for i, field in ipairs(fields) do
    if (tonumber(latest[i]) or 0) > seq then dropped[#dropped + 1] = field else kept = kept + 1 end
  end
  if kept == 0 then
    redis.call('HSET', ledger, 'state', 'running')
    return decide('superseded', table.concat(dropped, ','))
  end
end

-- The lock's value names the job and its run; an older run of this same job (kept after an
-- unknown outcome) is ours to take over.
local lock = lock_prefix .. account .. ':' .. subject
local owner = redis.call('GET', lock)
if owner and string.sub(owner, 1, #job + 1) ~= job .. '#' then
  -- The holder usually finishes within one request: look again soon, not at the lock's expiry.
  return later(math.min(redis.call('PTTL', lock), 20) + jitter_ms, 'locked')
end
if attempts >= max_attempts or now - tonumber(l[4]) > max_age_ms then
  redis.call('HSET', ledger, 'state', 'running')
  local decision = decide('exhausted', '')
  redis.call('SET', lock, job .. '#' .. run, 'PX', lock_ttl_ms)
  return decision
end

-- The account's rate limit, shared by every worker: GCRA with a burst of one request, in µs. A job
-- that must wait reserves its slot and sleeps in the queue until then, so it is tried once more,
-- not polled. A job that wakes too late for its slot (a busy worker) takes the next free slot:
-- using the old one late could put two requests in one interval.
local rate = redis.call('HMGET', rate_key, 'tat', 'pause_until')
local pause_until_us = (tonumber(rate[2]) or 0) * 1000
local tat = tonumber(rate[1]) or 0
local slot = tonumber(l[16]) or 0
local grace = math.max(2 * interval_us, grace_us)
local reserved = slot > 0 and slot <= now_us and slot >= now_us - grace and pause_until_us <= now_us
if not reserved then
  local start_at = math.max(tat, now_us, pause_until_us)
  redis.call('HSET', rate_key, 'tat', string.format('%d', start_at + interval_us))
  if start_at > now_us then
    redis.call('HSET', ledger, 'slot', string.format('%d', start_at))
    local reason = 'rate'
    if pause_until_us > now_us then reason = 'paused' end
    return later(math.ceil((start_at - now_us) / 1000), reason)
  end
end

attempts = attempts + 1
redis.call('HSET', ledger, 'state', 'running', 'attempts', attempts, 'slot', 0)
local decision = decide('go', table.concat(dropped, ','))
redis.call('SET', lock, job .. '#' .. run, 'PX', lock_ttl_ms)
if not (l[6] == 'add' and (phase == 'posting' or phase == 'unknown')) then
  -- The recovery point: the POST follows at once. An add of unknown outcome is reconciled first
  -- and writes its recovery point just before its own POST (post.lua).
  redis.call('HSET', ledger, 'phase', 'posting', 'posted_at', now)
  if l[6] == 'add' then redis.call('HSETNX', ledger, 'id_floor', redis.call('GET', newest_claim) or '0') end
end
return decision
