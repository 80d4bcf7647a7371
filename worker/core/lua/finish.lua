-- Record the end of runs of one account's changes and publish their events, atomically: a
-- terminal event is written exactly once, together with the ledger's final state, and the job
-- leaves the queue with it. Only a change's current run may finish it (fencing): a worker that
-- lost its lease is refused. A worker finishes the runs that end while its previous call is on
-- the way in one call (worker.core.ledger.Finisher): what every run pays once is paid once.
-- KEYS: 1 results stream, 2 dead-letter stream, 3 pending hash, 4 account queue zset, 5 account
--       claims hash, 6 account rate hash, 7 account newest-claim key, then for each run: its
--       ledger hash, its lock key. On a Redis Cluster KEYS 1 and 2 are both the account's outbox
--       (keys.outbox_key): each event goes there with its dead letter's fields, for the worker to
--       publish (worker.core.outbox), and the ledger names its outbox entry ('outbox') until then.
-- ARGV: 1 account, 2 retention (ms), 3 stream max length, 4 late-commit hold (ms): how long a
--       request of unknown outcome may still be applied by iVvy, 5 lock ttl (ms), then for each
--       run: job id, run (fencing token), outcome (succeeded | failed | superseded | retrying),
--       retry delay (ms, retrying), phase after ('' | 'unknown'), account pause (ms) or '',
--       created stage id to claim (adds) or '', stage id or '', history line (JSON), the number
--       of event fields and values, then those
-- Reply: per run, in order: {'ok', finished at (server ms), outbox entry id or ''} | {'stale', state}
--   when the ledger is terminal or gone, or another run owns the change ('fenced');
--   or {{'kind', key, the kind of value it holds, the kind this script keeps there}} when a key it
--   would write after its first write holds another kind (another program writes into this
--   database): nothing written, none of the runs recorded.
-- A terminal state records its event's stream id (event_id), so readers find the event without
-- scanning the stream. A lock's value is 'job#run#expires at' (start.lua): one taken by another
-- job since this run's lock expired is put back as it was.
local results, dlq, pending, queue, claims = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rate_key, newest_claim = KEYS[6], KEYS[7]
local account, retention_ms, maxlen, hold_ms, lock_ttl_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local outbox = results == dlq

--#include locks.lua
--#include kinds.lua

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local replies, done, created_ids, created_jobs = {}, {}, {}, {}

local function release(lock, job, run, unknown_until)
  if unknown_until > now then
    -- A request whose outcome is unknown may still be applied by iVvy for a while: until then no
    -- other change of this stage may be sent, whatever becomes of this one (also when this run's
    -- lock expired while it ran, or names the run of its batch's claim).
    take_lock(lock, job, run, unknown_until)
    return
  end
  local owner = redis.call('GETDEL', lock)
  if owner and not held_by(owner, job, run) then
    local expires = lock_expiry(owner)
    if not expires then redis.call('SET', lock, owner, 'PX', lock_ttl_ms) -- a value without its expiry
    elseif expires > now then redis.call('SET', lock, owner, 'PXAT', expires) end
  end
end

local LEDGER_FIELDS = {'state', 'history', 'change', 'gen', 'run', 'unknown_until', 'stage_key', 'seq'}

-- Why this run may not finish its change ('' when it may): its ledger entry as read.
local function refusal(l, run)
  local state = l[1]
  if not state or state == 'succeeded' or state == 'failed' or state == 'superseded' then return state or 'missing' end
  if l[5] ~= run then return 'fenced' end
  return ''
end

local function finish_one(ledger, lock, a, first, l)
  local job, run, outcome, delay_ms, phase_after = a[first], a[first + 1], a[first + 2], a[first + 3], a[first + 4]
  local pause_ms, created, stage_id, history_line = a[first + 5], a[first + 6], a[first + 7], a[first + 8]
  local nfields = tonumber(a[first + 9])
  local event = {unpack(a, first + 10, first + 9 + nfields)}
  local refused = refusal(l, run)
  if refused ~= '' then return {'stale', refused} end
  local history = (l[2] or '') .. history_line .. '\n'
  local terminal = outcome ~= 'retrying'
  local event_id, outbox_id = '', ''
  if outbox then
    -- The outbox entry: the ledger to tell once published ('' while not terminal), the dead letter's
    -- fields ('' unless failed), then the event.
    outbox_id = redis.call('XADD', results, '*', 'ledger', terminal and ledger or '',
      'letter', outcome == 'failed' and '1' or '', 'original_change', l[3], 'generation', l[4] or '0', unpack(event))
  else
    event_id = redis.call('XADD', results, 'MAXLEN', '~', maxlen, '*', unpack(event))
  end
  local unknown_until = tonumber(l[6]) or 0
  if phase_after == 'unknown' then unknown_until = math.max(unknown_until, now + hold_ms) end
  release(lock, job, run, unknown_until)
  if outcome == 'retrying' then
    local next_at = now + tonumber(delay_ms)
    redis.call('HSET', ledger, 'state', 'retrying', 'phase', phase_after, 'next_at', next_at, 'history', history,
      'unknown_until', unknown_until)
    if pause_ms ~= '' then
      local pause_until = now + tonumber(pause_ms)
      if pause_until > (tonumber(redis.call('HGET', rate_key, 'pause_until')) or 0) then
        redis.call('HSET', rate_key, 'pause_until', pause_until)
      end
    end
    redis.call('ZADD', queue, next_at, job)
    redis.call('PERSIST', ledger) -- no expiry until it is done (one of an older version's goes)
  else
    redis.call('HSET', ledger, 'state', outcome, 'phase', '', 'finished_at', now, 'stage_id', stage_id,
      'history', history, 'event_id', event_id)
    if outbox then redis.call('HSET', ledger, 'outbox', outbox_id) end
    redis.call('PEXPIRE', ledger, retention_ms) -- kept for the retention from its terminal state
    done[#done + 1] = job
    -- No longer one of its stage's pending updates (worker.keys.stage_key).
    if l[7] then redis.call('HDEL', l[7], 'j' .. l[8]) end
    if created ~= '' then
      created_ids[#created_ids + 1] = created
      created_jobs[#created_jobs + 1] = job
    end
  end
  if outcome == 'failed' and not outbox then
    -- The dead letter carries the whole original change, so a replay needs nothing else.
    redis.call('XADD', dlq, '*', 'original_change', l[3], 'generation', l[4] or '0', unpack(event))
  end
  return {'ok', tostring(now), outbox_id}
end

-- Every run's ledger entry is read before the first write; a write refused midway (WRONGTYPE) would
-- leave the writes before it (a failed change's event without its dead letter, a terminal entry its
-- queue still holds): the keys written after the first write (an event's XADD) are checked first,
-- for the runs that may finish. A ledger read twice in one call is read again once written.
local firsts, reads, kinds = {}, {}, {}
local first = 6
for i = 8, #KEYS, 2 do
  local run = #firsts + 1
  firsts[run] = first
  local l = read('hash', 'HMGET', KEYS[i], unpack(LEDGER_FIELDS))
  if not l then return {{'kind', unpack(foreign)}} end
  reads[run] = l
  if refusal(l, ARGV[first + 1]) == '' then
    local outcome = ARGV[first + 2]
    kinds[KEYS[i + 1]], kinds[queue] = 'string', 'zset'
    if outcome == 'retrying' then
      if ARGV[first + 5] ~= '' then kinds[rate_key] = 'hash' end
    else
      kinds[pending] = 'hash'
      if l[7] then kinds[l[7]] = 'hash' end
      if ARGV[first + 6] ~= '' then kinds[claims], kinds[newest_claim] = 'hash', 'string' end
    end
    if outcome == 'failed' and not outbox then kinds[dlq] = 'stream' end
  end
  first = first + 10 + tonumber(ARGV[first + 9])
end
local refused = mismatch(kinds)
if refused then return {{'kind', unpack(refused)}} end
local written = {}
for run, at in ipairs(firsts) do
  local ledger = KEYS[6 + 2 * run]
  local l = written[ledger] and redis.call('HMGET', ledger, unpack(LEDGER_FIELDS)) or reads[run]
  replies[run] = finish_one(ledger, KEYS[7 + 2 * run], ARGV, at, l)
  written[ledger] = true
end

if #done > 0 then
  redis.call('ZREM', queue, unpack(done))
  if redis.call('HINCRBY', pending, account, -#done) <= 0 then redis.call('HDEL', pending, account) end
end
if #created_ids > 0 then
  -- The stages these adds created are theirs (an add that adopted one first keeps it), and the
  -- newest claimed id moves up: later adds reconcile only above it.
  local owners = redis.call('HMGET', claims, unpack(created_ids))
  local known = tonumber(redis.call('GET', newest_claim)) or 0
  local claimed, newest = {}, known
  for i, id in ipairs(created_ids) do
    if not owners[i] then
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = created_jobs[i]
    end
    newest = math.max(newest, tonumber(id))
  end
  if #claimed > 0 then redis.call('HSET', claims, unpack(claimed)) end
  if newest > known then redis.call('SET', newest_claim, newest) end
end
return replies
