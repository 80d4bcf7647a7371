-- Enqueue one change (or replay a dead-lettered one): the ledger entry, the ordering sequence and
-- the queue entry, atomically. The ledger hash is the job's record; the queue holds only its id.
-- KEYS: 1 ledger hash, 2 queue zset, 3 stage hash (updates; the ledger otherwise), 4 dead-letter stream
-- ARGV: 1 job id, 2 change (canonical JSON), 3 operation, 4 stage id or '', 5 changed fields (csv),
--       6 account, 7 idempotency key, 8 source, 9 now (ms), 10 retention (ms), 11 lock subject,
--       12 mode ('enqueue' | 'replay'), 13 dead-letter entry id to remove or '',
--       14 generation of that dead letter or ''
-- Returns {'queued', generation} | {'duplicate', state} | {'conflict'} | {'not_failed', state}
local existing = redis.call('HMGET', KEYS[1], 'change', 'state', 'gen')
local gen = 0
if ARGV[12] == 'replay' then
  if existing[2] and existing[2] ~= 'failed' then return {'not_failed', existing[2]} end
  gen = (tonumber(existing[3]) or tonumber(ARGV[14]) or 0) + 1
elseif existing[1] then
  if existing[1] == ARGV[2] then return {'duplicate', existing[2]} end
  return {'conflict'}
end
local seq = ''
if ARGV[3] == 'update' then
  -- Every field this change sets now belongs to it: an older change must not send it any more.
  seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
  local pairs_ = {}
  for field in string.gmatch(ARGV[5], '[^,]+') do
    pairs_[#pairs_ + 1] = field
    pairs_[#pairs_ + 1] = seq
  end
  redis.call('HSET', KEYS[3], unpack(pairs_))
  redis.call('PEXPIRE', KEYS[3], ARGV[10])
end
redis.call('HSET', KEYS[1], 'change', ARGV[2], 'op', ARGV[3], 'stage_id', ARGV[4], 'fields', ARGV[5],
  'account', ARGV[6], 'key', ARGV[7], 'source', ARGV[8], 'enqueued_at', ARGV[9], 'seq', seq,
  'lock', ARGV[11], 'state', 'queued', 'phase', '', 'attempts', 0, 'next_at', 0, 'slot', 0, 'gen', gen)
redis.call('PEXPIRE', KEYS[1], ARGV[10])
redis.call('ZADD', KEYS[2], ARGV[9], ARGV[1])
if ARGV[13] ~= '' then redis.call('XDEL', KEYS[4], ARGV[13]) end
return {'queued', gen}
