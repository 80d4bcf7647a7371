-- Begin an attempt: decide whether this job may talk to iVvy now, and record the recovery point.
-- KEYS: 1 ledger hash, 2 account rate hash, 3 stage hash (updates; the ledger otherwise), 4 lock key
-- ARGV: 1 job id, 2 now (ms), 3 max attempts, 4 max age (ms), 5 rate interval (µs), 6 lock ttl (ms),
--       7 in-flight guard (ms), 8 worker id, 9 now (µs, for the rate limiter's precision)
-- Returns one of
--   {'missing'}                          the ledger entry is gone (expired)
--   {'done', state}                      already terminal
--   {'wait', ms, reason}                 not now: backoff | in_flight | locked | paused | rate
--   {'superseded', dropped csv}          every field was overtaken by a newer change
--   {'exhausted', phase, attempts}       out of attempts or too old (lock held, for a reconcile)
--   {'go', attempt, previous phase, dropped csv}
-- and superseded, exhausted and go append the change's facts: source, enqueued at (ms), generation.
local job, now = ARGV[1], tonumber(ARGV[2])
local l = redis.call('HMGET', KEYS[1], 'state', 'phase', 'attempts', 'enqueued_at', 'next_at', 'op', 'seq',
  'fields', 'attempt_at', 'source', 'gen')
local state, phase = l[1], l[2] or ''
local function decide(decision, a, b, c)
  return {decision, a, b, c, l[10] or '', l[4], l[11] or '0'}
end
if not state then return {'missing'} end
if state == 'succeeded' or state == 'failed' or state == 'superseded' then return {'done', state} end
local next_at = tonumber(l[5]) or 0
if next_at > now then return {'wait', next_at - now, 'backoff'} end
if phase == 'posting' then
  -- A worker may still be waiting for iVvy's answer to the previous attempt: let it time out first.
  local guard_end = (tonumber(l[9]) or 0) + tonumber(ARGV[7])
  if guard_end > now then return {'wait', guard_end - now, 'in_flight'} end
end

local dropped = {}
if l[6] == 'update' then
  local seq, fields, kept = tonumber(l[7]), {}, 0
  for field in string.gmatch(l[8], '[^,]+') do fields[#fields + 1] = field end
  local latest = redis.call('HMGET', KEYS[3], unpack(fields))
  for i, field in ipairs(fields) do
    if (tonumber(latest[i]) or 0) > seq then dropped[#dropped + 1] = field else kept = kept + 1 end
  end
  if kept == 0 then return decide('superseded', table.concat(dropped, ','), '', '') end
end

local owner = redis.call('GET', KEYS[4])
if owner and owner ~= job then
  return {'wait', math.max(redis.call('PTTL', KEYS[4]), 1), 'locked'}
end
local attempts = tonumber(l[3]) or 0
if attempts >= tonumber(ARGV[3]) or now - tonumber(l[4]) > tonumber(ARGV[4]) then
  redis.call('SET', KEYS[4], job, 'PX', ARGV[6])
  return decide('exhausted', phase, attempts, '')
end

-- The account's rate limit, shared by every worker: GCRA with a burst of one request, in µs so that
-- high limits are exact.
local rate = redis.call('HMGET', KEYS[2], 'tat', 'pause_until')
local pause_until = tonumber(rate[2]) or 0
if pause_until > now then return {'wait', pause_until - now, 'paused'} end
local now_us = tonumber(ARGV[9])
local tat = math.max(tonumber(rate[1]) or 0, now_us)
if tat > now_us then return {'wait', math.ceil((tat - now_us) / 1000), 'rate'} end
redis.call('HSET', KEYS[2], 'tat', string.format('%d', tat + tonumber(ARGV[5])))

redis.call('SET', KEYS[4], job, 'PX', ARGV[6])
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'state', 'running', 'phase', 'posting', 'attempts', attempts, 'attempt_at', now,
  'worker', ARGV[8])
return decide('go', attempts, phase, table.concat(dropped, ','))
