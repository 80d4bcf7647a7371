-- Start a job: claim it from the queue and decide whether it may talk to iVvy now, in one step.
-- KEYS: 1 queue zset, 2 ledger hash, 3 account rate hash
-- ARGV: 1 job id, 2 now (ms), 3 now (µs), 4 lease (ms), 5 max attempts, 6 max age (ms),
--       7 rate interval (µs), 8 lock ttl (ms), 9 in-flight guard (ms), 10 worker id,
--       11 stage key prefix, 12 lock key prefix, 13 jitter (ms) for lock waits,
--       14 how late (µs) a job may wake for its reserved rate-limit slot
-- The stage hash and lock key are built from the prefixes and the ledger's account, stage id and
-- lock subject (worker.keys builds the same names).
-- Returns one of
--   {'skip'}                             not due (another worker has it, or it was rescheduled)
--   {'missing'} | {'done', state}        no ledger entry (expired) | already terminal: dropped
--   {'wait', ms, reason}                 rescheduled: backoff | in_flight | locked | paused | rate
--   {decision, a, b, c, source, enqueued at (ms), generation, change} with decision
--     'superseded' (a: dropped csv) | 'exhausted' (a: phase, b: attempts; lock held) |
--     'go' (a: attempt, b: previous phase, c: dropped csv); the job is then hidden for one lease.
local job, now, now_us = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local score = redis.call('ZSCORE', KEYS[1], job)
if not score or tonumber(score) > now then return {'skip'} end

local l = redis.call('HMGET', KEYS[2], 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
  'fields', 'attempt_at', 'source', 'gen', 'change', 'account', 'stage_id', 'lock', 'slot')
local state, phase = l[1], l[2] or ''
if not state or state == 'succeeded' or state == 'failed' or state == 'superseded' then
  redis.call('ZREM', KEYS[1], job)
  if not state then return {'missing'} end
  return {'done', state}
end
local function later(ms, reason)
  redis.call('ZADD', KEYS[1], now + ms, job)
  return {'wait', ms, reason}
end
local function decide(decision, a, b, c)
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), job)
  return {decision, a, b, c, l[10] or '', l[4], l[11] or '0', l[12]}
end

local next_at = tonumber(l[5]) or 0
if next_at > now then return later(next_at - now, 'backoff') end
if phase == 'posting' then
  -- A worker may still be waiting for iVvy's answer to the previous attempt: let it time out first.
  local guard_end = (tonumber(l[9]) or 0) + tonumber(ARGV[9])
  if guard_end > now then return later(guard_end - now, 'in_flight') end
end

local dropped = {}
if l[6] == 'update' then
  local seq, fields, kept = tonumber(l[7]), {}, 0
  for field in string.gmatch(l[8], '[^,]+') do fields[#fields + 1] = field end
  local latest = redis.call('HMGET', ARGV[11] .. l[13] .. ':' .. l[14], unpack(fields))
  for i, field in ipairs(fields) do
    if (tonumber(latest[i]) or 0) > seq then dropped[#dropped + 1] = field else kept = kept + 1 end
  end
  if kept == 0 then return decide('superseded', table.concat(dropped, ','), '', '') end
end

local lock = ARGV[12] .. l[13] .. ':' .. l[15]
local owner = redis.call('GET', lock)
if owner and owner ~= job then
  -- The holder usually finishes within one request: look again soon, not at the lock's expiry.
  return later(math.min(redis.call('PTTL', lock), 20) + tonumber(ARGV[13]), 'locked')
end
local attempts = tonumber(l[3]) or 0
if attempts >= tonumber(ARGV[5]) or now - tonumber(l[4]) > tonumber(ARGV[6]) then
  redis.call('SET', lock, job, 'PX', ARGV[8])
  return decide('exhausted', phase, attempts, '')
end

-- The account's rate limit, shared by every worker: GCRA with a burst of one request, in µs. A job
-- that must wait reserves its slot and sleeps in the queue until then, so it is tried once more,
-- not polled. A job that wakes too late for its slot (a busy worker) takes the next free slot:
-- using the old one late could put two requests in one interval.
local interval = tonumber(ARGV[7])
local rate = redis.call('HMGET', KEYS[3], 'tat', 'pause_until')
local pause_until_us = (tonumber(rate[2]) or 0) * 1000
local tat = tonumber(rate[1]) or 0
local slot = tonumber(l[16]) or 0
local grace = math.max(2 * interval, tonumber(ARGV[14]))
local reserved = slot > 0 and slot <= now_us and slot >= now_us - grace and pause_until_us <= now_us
if not reserved then
  local start_at = math.max(tat, now_us, pause_until_us)
  redis.call('HSET', KEYS[3], 'tat', string.format('%d', start_at + interval))
  if start_at > now_us then
    redis.call('HSET', KEYS[2], 'slot', string.format('%d', start_at))
    local reason = 'rate'
    if pause_until_us > now_us then reason = 'paused' end
    return later(math.ceil((start_at - now_us) / 1000), reason)
  end
end

redis.call('SET', lock, job, 'PX', ARGV[8])
attempts = attempts + 1
redis.call('HSET', KEYS[2], 'state', 'running', 'phase', 'posting', 'attempts', attempts, 'attempt_at', now,
  'worker', ARGV[10], 'slot', 0)
return decide('go', attempts, phase, table.concat(dropped, ','))
