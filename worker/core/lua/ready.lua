-- The schedule of accounts: which account a worker serves next. Each account that may have a
-- change to send is a member, scored by the server ms from which it may (its queue's head, once
-- its rate limiter has a free slot). Serving the lowest score first is round-robin among accounts
-- that are due: an account just served is scored at its next free slot, behind the others.
-- KEYS: 1 schedule zset (account -> from when), 2 wake list, 3 epoch hash (account -> notices)
-- ARGV: 1 mode, then by mode:
--   'pick' 2 lease (ms): take the first due account and hide it for one lease (a worker that
--     dies meanwhile leaves it due again by itself).
--     Reply: {account or '', its epoch, ms until the first account is due (-1: none)}
--   'notify' 2 when (server ms, '' = now), 3.. accounts: they have work from then on (enqueue, a
--     retry); an idle worker is woken when that is sooner than what was scheduled. Reply: 'ok'
--   'set' 2 account, 3 epoch from its pick, 4 when it may next have work (-1: its queue is empty),
--     5 '1' to wake an idle worker (the caller will not come back for it itself: it is busy):
--     after a claim. A notice since the pick (the epoch moved) may have made it due sooner: then
--     the sooner of the two is kept. 6 lease (ms) or '': then the next pick in the same call.
--     Reply: 'ok', or the pick's reply
local ready, wake, epoch = KEYS[1], KEYS[2], KEYS[3]
local mode = ARGV[1]
-- The server's clock, read by 'pick' and 'notify' ('set' is told its time).
local function server_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

local function wake_one()
  -- One token at a time: a woken worker that finds more due work passes the word on (pick).
  if redis.call('LLEN', wake) == 0 then redis.call('RPUSH', wake, '1') end
end

-- The first due account, hidden for one lease (ms); else how long until the first is due.
local function pick(lease_ms)
  local now = server_ms()
  local first = redis.call('ZRANGE', ready, 0, 1, 'WITHSCORES')
  if not first[1] then return {'', 0, -1} end
  if tonumber(first[2]) > now then return {'', 0, tonumber(first[2]) - now} end
  redis.call('ZADD', ready, now + tonumber(lease_ms), first[1])
  if first[3] and tonumber(first[4]) <= now then wake_one() end
  return {first[1], redis.call('HGET', epoch, first[1]) or '0', 0}
end

if mode == 'pick' then
  return pick(ARGV[2])
elseif mode == 'notify' then
  local now = server_ms()
  local at = tonumber(ARGV[2]) or now
  local head = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
  for i = 3, #ARGV do
    redis.call('HINCRBY', epoch, ARGV[i], 1)
    redis.call('ZADD', ready, 'LT', at, ARGV[i])
  end
  if not head[1] or at < tonumber(head[2]) or at <= now then wake_one() end
  return 'ok'
end
local account, seen, at = ARGV[2], ARGV[3], tonumber(ARGV[4])
if (redis.call('HGET', epoch, account) or '0') ~= seen then
  if at >= 0 then redis.call('ZADD', ready, 'LT', at, account) end
elseif at < 0 then
  redis.call('ZREM', ready, account)
else
  redis.call('ZADD', ready, at, account)
end
if at >= 0 and ARGV[5] == '1' then wake_one() end
if ARGV[6] ~= '' then return pick(ARGV[6]) end
return 'ok'
