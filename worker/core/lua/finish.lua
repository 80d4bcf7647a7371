-- Record the end of a run and publish its event, atomically: a terminal event is written exactly
-- once, together with the ledger's final state, and the job leaves the queue with it. Only the
-- change's current run may finish it (fencing): a worker that lost its lease is refused.
-- KEYS: 1 ledger hash, 2 results stream, 3 dead-letter stream, 4 lock key, 5 account claims hash,
--       6 account rate hash, 7 account queue zset, 8 account newest-claim key, 9 pending hash
-- ARGV: 1 job id, 2 run (fencing token), 3 outcome (succeeded | failed | superseded | retrying),
--       4 retention (ms), 5 stream max length, 6 retry delay (ms, retrying), 7 phase after
--       ('' | 'unknown'), 8 late-commit hold (ms): how long a request of unknown outcome may still
--       be applied by iVvy, 9 account pause (ms) or '', 10 created stage id to claim (adds) or '',
--       11 stage id or '', 12 history line (JSON), 13 account, 14.. event fields and values
-- Reply: {'ok', finished at (server ms)} | {'stale', state} when the ledger is terminal or gone, or
--   another run owns the change ('fenced').
-- A terminal state records its event's stream id (event_id), so readers find the event without
-- scanning the stream.
local ledger, results, dlq, lock, claims = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rate_key, queue, newest_claim, pending = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local job, run, outcome, retention_ms, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local delay_ms, phase_after, hold_ms, pause_ms = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), ARGV[9]
local created, stage_id, history_line, account = ARGV[10], ARGV[11], ARGV[12], ARGV[13]

local l = redis.call('HMGET', ledger, 'state', 'history', 'change', 'gen', 'run', 'unknown_until', 'stage_key', 'seq')
local state = l[1]
if not state or state == 'succeeded' or state == 'failed' or state == 'superseded' then
  return {'stale', state or 'missing'}
end
if l[5] ~= run then return {'stale', 'fenced'} end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local history = (l[2] or '') .. history_line .. '\n'
local event_id = redis.call('XADD', results, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 14))

-- A request whose outcome is unknown may still be applied by iVvy for a while: until then no other
-- change of this stage may be sent, whatever becomes of this one (retried, superseded, failed).
local unknown_until = tonumber(l[6]) or 0
if phase_after == 'unknown' then unknown_until = math.max(unknown_until, now + hold_ms) end
local function release_lock()
  if redis.call('GET', lock) == job .. '#' .. run then
    if unknown_until > now then redis.call('PEXPIREAT', lock, unknown_until) else redis.call('DEL', lock) end
  end
end

if outcome == 'retrying' then
  local next_at = now + delay_ms
  redis.call('HSET', ledger, 'state', 'retrying', 'phase', phase_after, 'next_at', next_at, 'history', history,
    'unknown_until', unknown_until)
  redis.call('PEXPIRE', ledger, retention_ms)
  if pause_ms ~= '' then
    local pause_until = now + tonumber(pause_ms)
    if pause_until > (tonumber(redis.call('HGET', rate_key, 'pause_until')) or 0) then
      redis.call('HSET', rate_key, 'pause_until', pause_until)
    end
  end
  release_lock()
  redis.call('ZADD', queue, next_at, job)
else
  redis.call('HSET', ledger, 'state', outcome, 'phase', '', 'finished_at', now, 'stage_id', stage_id,
    'history', history, 'event_id', event_id)
  redis.call('PEXPIRE', ledger, retention_ms)
  if created ~= '' then
    redis.call('HSETNX', claims, created, job)
    if tonumber(created) > (tonumber(redis.call('GET', newest_claim)) or 0) then
      redis.call('SET', newest_claim, created)
    end
  end
  release_lock()
  redis.call('ZREM', queue, job)
  -- No longer one of its stage's pending updates (worker.keys.stage_key).
  if l[7] then redis.call('HDEL', l[7], 'j' .. l[8]) end
  if redis.call('HINCRBY', pending, account, -1) <= 0 then redis.call('HDEL', pending, account) end
end
if outcome == 'failed' then
  -- The dead letter carries the whole original change, so a replay needs nothing else.
  redis.call('XADD', dlq, '*', 'original_change', l[3], 'generation', l[4] or '0', unpack(ARGV, 14))
end
return {'ok', tostring(now)}
