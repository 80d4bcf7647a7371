-- Record the end of an attempt and publish its event, atomically: a terminal event is written
-- exactly once, together with the ledger's final state, and the job leaves the queue with it.
-- KEYS: 1 ledger hash, 2 results stream, 3 dead-letter stream, 4 lock key, 5 account claims hash,
--       6 account rate hash, 7 queue zset
-- ARGV: 1 job id, 2 outcome (succeeded | failed | superseded | retrying), 3 now (ms), 4 retention (ms),
--       5 stream max length, 6 next attempt at (ms, retrying), 7 phase after ('' | 'unknown'),
--       8 lock hold (ms; kept after an unknown outcome), 9 account pause until (ms or ''),
--       10 created stage id to claim (adds) or '', 11 stage id or '', 12 history line (JSON),
--       13.. event fields and values
-- Returns {'ok'} or {'stale', state} when the ledger is already terminal or gone. A terminal state
-- records its event's stream id (event_id), so readers find the event without scanning the stream.
local job, outcome, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local l = redis.call('HMGET', KEYS[1], 'state', 'history', 'change', 'gen')
local state = l[1]
if not state or state == 'succeeded' or state == 'failed' or state == 'superseded' then
  return {'stale', state or 'missing'}
end
local history = (l[2] or '') .. ARGV[12] .. '\n'
local event_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(ARGV, 13))

local function release_lock(hold_ms)
  if redis.call('GET', KEYS[4]) == job then
    if hold_ms > 0 then redis.call('PEXPIRE', KEYS[4], hold_ms) else redis.call('DEL', KEYS[4]) end
  end
end

if outcome == 'retrying' then
  redis.call('HSET', KEYS[1], 'state', 'retrying', 'phase', ARGV[7], 'next_at', ARGV[6], 'history', history)
  if ARGV[9] ~= '' then
    local pause_until = tonumber(redis.call('HGET', KEYS[6], 'pause_until')) or 0
    if tonumber(ARGV[9]) > pause_until then redis.call('HSET', KEYS[6], 'pause_until', ARGV[9]) end
  end
  release_lock(ARGV[7] == 'unknown' and tonumber(ARGV[8]) or 0)
  redis.call('ZADD', KEYS[7], ARGV[6], job)
else
  redis.call('HSET', KEYS[1], 'state', outcome, 'phase', '', 'finished_at', now, 'stage_id', ARGV[11],
    'history', history, 'event_id', event_id)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  if ARGV[10] ~= '' then redis.call('HSETNX', KEYS[5], ARGV[10], job) end
  release_lock(0)
  redis.call('ZREM', KEYS[7], job)
end
if outcome == 'failed' then
  -- The dead letter carries the whole original change, so a replay needs nothing else.
  redis.call('XADD', KEYS[3], '*', 'original_change', l[3], 'generation', l[4] or '0', unpack(ARGV, 13))
end
return {'ok'}
