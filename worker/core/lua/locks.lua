-- Stage locks, shared by start.lua, batch.lua and finish.lua (each names this file in an
-- `--#include` line, which worker.core.scripts replaces with it). A lock's value is
-- job#run#expires at (server ms), parsed from the right: a job id may itself contain '#' (the
-- lock of key 'k#1' is not key 'k''s).

local function lock_value(job, run, until_ms)
  return job .. '#' .. run .. '#' .. until_ms
end

-- Whether a lock's value names this job, any of its runs.
local function owned_by(owner, job)
  return string.match(owner, '^(.*)#%d+#%d+$') == job
end

-- Whether a lock's value names this run of this job.
local function held_by(owner, job, run)
  return string.match(owner, '^(.*#%d+)#%d+$') == job .. '#' .. run
end

-- When a lock's value says it expires (nil for a value without it).
local function lock_expiry(owner)
  return tonumber(string.match(owner, '#(%d+)$'))
end

-- The stage's lock for this run of `job` until `until_ms`, unless another change holds it: one
-- that ended, or that names an earlier run of the same job, is taken.
local function take_lock(lock, job, run, until_ms)
  local owner = redis.call('GET', lock)
  if not owner or owned_by(owner, job) then
    redis.call('SET', lock, lock_value(job, run, until_ms), 'PXAT', until_ms)
  end
end
