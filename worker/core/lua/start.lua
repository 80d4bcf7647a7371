-- Claim a change of one account and decide whether it may talk to iVvy now, in one step, by the
-- server's clock (no client clock decides anything). Given a job id, that job; given '', the
-- account's due jobs in due order until one has work to do: a job is read only when it is due,
-- and one that could be sent waits untouched in the queue while the account's rate limiter has no
-- free slot (the worker picks the account again when it has one).
-- KEYS: 1 account queue zset, 2 account rate hash, 3 account newest-claim key
-- ARGV: 1 job id or '' (the account's next due job), 2 lease (ms), 3 max attempts, 4 max age (ms),
--       5 rate interval (µs), 6 lock ttl (ms), 7 in-flight guard (ms), 8 worker id,
--       9 the account's ledger key prefix (worker.keys: prefix .. idempotency key), 10 jitter (ms)
--       for lock waits, 11 ledger retention (ms)
-- The stage hash and lock key of a change are read from its ledger entry (stage_key, lock_key:
-- named by worker.keys at enqueue, in the account's slot).
-- Reply, always 14 items (worker.ledger parses it into a Start):
--   {decision, wait ms, wait reason, run, attempt, previous phase, dropped csv, source,
--    enqueued at (ms), generation, change, state, job id, account next (server ms, -1: empty)}
--   decision: idle | skip | missing | done | wait | superseded | exhausted | go
--   (worker.states.Decision). superseded, exhausted and go start a new run (the fencing token) and
--   hide the job for one lease; go also counts an attempt, takes a rate-limit slot and the lock.
local queue, rate_key, newest_claim = KEYS[1], KEYS[2], KEYS[3]
local wanted, lease_ms, max_attempts, max_age_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local interval_us, lock_ttl_ms, guard_ms, worker_id = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8]
local ledger_prefix, jitter_ms, retention_ms = ARGV[9], tonumber(ARGV[10]), ARGV[11]

local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now = math.floor(now_us / 1000)
local rate = redis.call('HMGET', rate_key, 'tat', 'pause_until')
local tat = tonumber(rate[1]) or 0
local pause_until_us = (tonumber(rate[2]) or 0) * 1000
local free_at_us = math.max(tat, pause_until_us)

-- When the account may next have a change to send: its queue's head, once the rate limit allows.
local function account_next()
  local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
  if not head[1] then return -1 end
  return math.max(tonumber(head[2]), math.ceil(free_at_us / 1000))
end

local function reply(decision, job, wait_ms, reason, run, attempt, phase, dropped, l)
  l = l or {}
  return {decision, wait_ms or 0, reason or '', run or 0, attempt or 0, phase or '', dropped or '',
    l[10] or '', l[4] or '0', l[11] or '0', l[12] or '', l[1] or '', job or '', account_next()}
end

-- One due job: a decision, or nil when it was put back for later (the claim goes on to the next).
local function consider(job)
  local ledger = ledger_prefix .. string.sub(job, string.find(job, ':', 1, true) + 1)
  local l = redis.call('HMGET', ledger, 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
    'fields', 'posted_at', 'source', 'gen', 'change', 'stage_key', 'lock_key', 'run')
  local state, phase = l[1], l[2] or ''
  local attempts, run = tonumber(l[3]) or 0, tonumber(l[15]) or 0
  if not state or state == 'succeeded' or state == 'failed' or state == 'superseded' then
    redis.call('ZREM', queue, job)
    if not state then return reply('missing', job) end
    return reply('done', job, 0, '', 0, 0, '', '', l)
  end
  -- Touched, so kept: a change held back for a long time must not outlive its ledger entry.
  redis.call('PEXPIRE', ledger, retention_ms)

  local function later(ms, reason)
    redis.call('ZADD', queue, now + ms, job)
    if wanted ~= '' then return reply('wait', job, ms, reason) end
    return nil
  end
  local function decide(decision, dropped, fields)
    run = run + 1
    redis.call('HSET', ledger, 'state', 'running', 'run', run, 'worker', worker_id, unpack(fields or {}))
    redis.call('ZADD', queue, now + lease_ms, job)
    return reply(decision, job, 0, '', run, attempts, phase, dropped, l)
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
    local latest = redis.call('HMGET', l[13], unpack(fields))
    for i, field in ipairs(fields) do
      if (tonumber(latest[i]) or 0) > seq then dropped[#dropped + 1] = field else kept = kept + 1 end
    end
    if kept == 0 then return decide('superseded', table.concat(dropped, ',')) end
  end

  -- The lock's value names the job and its run; an older run of this same job (kept after an
  -- unknown outcome) is ours to take over.
  local lock = l[14]
  local owner = redis.call('GET', lock)
  if owner and string.sub(owner, 1, #job + 1) ~= job .. '#' then
    -- The holder usually finishes within one request: look again soon, not at the lock's expiry.
    return later(math.min(redis.call('PTTL', lock), 20) + jitter_ms, 'locked')
  end
  if attempts >= max_attempts or now - tonumber(l[4]) > max_age_ms then
    local decision = decide('exhausted', '')
    redis.call('SET', lock, job .. '#' .. run, 'PX', lock_ttl_ms)
    return decision
  end

  -- The account's rate limit, shared by every worker: GCRA with a burst of one request, in µs. No
  -- slot is reserved ahead: while none is free the change is left as it is.
  if free_at_us > now_us then
    local reason = 'rate'
    if pause_until_us > now_us then reason = 'paused' end
    if wanted ~= '' then return later(math.ceil((free_at_us - now_us) / 1000), reason) end
    return reply('idle', '', math.ceil((free_at_us - now_us) / 1000), reason)
  end
  tat = math.max(tat, now_us) + interval_us
  free_at_us = math.max(tat, pause_until_us)
  redis.call('HSET', rate_key, 'tat', string.format('%d', tat))

  attempts = attempts + 1
  local recovery = {'attempts', attempts}
  if not (l[6] == 'add' and (phase == 'posting' or phase == 'unknown')) then
    -- The recovery point: the POST follows at once. An add of unknown outcome is reconciled first
    -- and writes its recovery point just before its own POST (post.lua).
    for _, v in ipairs({'phase', 'posting', 'posted_at', now}) do recovery[#recovery + 1] = v end
  end
  local decision = decide('go', table.concat(dropped, ','), recovery)
  redis.call('SET', lock, job .. '#' .. run, 'PX', lock_ttl_ms)
  if recovery[3] and l[6] == 'add' then
    redis.call('HSETNX', ledger, 'id_floor', redis.call('GET', newest_claim) or '0')
  end
  return decision
end

if wanted ~= '' then
  local score = redis.call('ZSCORE', queue, wanted)
  if not score or tonumber(score) > now then return reply('skip', wanted) end
  return consider(wanted)
end
-- A few due jobs per call at most, so that one call stays short whatever the backlog.
for _, job in ipairs(redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, 16)) do
  local decision = consider(job)
  if decision then return decision end
end
return reply('idle')
