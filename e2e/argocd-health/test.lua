-- Test harness for charts/sluice/argocd/health.lua, the Argo CD health check
-- of StreamingQuery. Run by e2e/argocd-health.sh:
--
--   lua5.4 e2e/argocd-health/test.lua charts/sluice/argocd/health.lua
--
-- Each case gives a sample StreamingQuery (as Argo CD would decode it from
-- JSON, written here as a Lua table), the expected health status, and a
-- substring the message must contain (or, with `exact`, the whole message).
-- The script is loaded afresh for every case, the way Argo CD does, with
-- `obj` as its only extra global. Prints one line per case, then
-- "argocd-health: P passed, F failed"; exits 1 if any case failed.

local script = arg[1] or "charts/sluice/argocd/health.lua"

-- Helpers to build sample objects --------------------------------------------

local function condition(type_, status, message, reason)
  return {
    type = type_,
    status = status,
    reason = reason or type_,
    message = message,
    lastTransitionTime = "2024-05-01T12:00:00Z",
  }
end

-- A StreamingQuery at metadata.generation `generation`, with the given spec
-- (may be nil) and status (may be nil).
local function query(generation, spec, status)
  return {
    apiVersion = "sluice.dev/v1alpha1",
    kind = "StreamingQuery",
    metadata = { name = "orders", namespace = "default", generation = generation },
    spec = spec or { sql = "SELECT * FROM orders" },
    status = status,
  }
end

-- The cases -------------------------------------------------------------------

local cases = {
  {
    name = "no status at all",
    obj = query(1, nil, nil),
    status = "Progressing",
    exact = "Waiting for the operator to observe generation 1",
  },
  {
    name = "status without observedGeneration",
    obj = query(1, nil, { phase = "Pending" }),
    status = "Progressing",
    contains = "observe generation 1",
  },
  {
    name = "stale observedGeneration hides an old Running/Ready status",
    obj = query(3, nil, {
      phase = "Running",
      observedGeneration = 2,
      conditions = { condition("Ready", "True", "Query is running") },
    }),
    status = "Progressing",
    exact = "Waiting for the operator to observe generation 3",
  },
  {
    -- Numbers decoded from JSON may be floats: the message must still say
    -- "generation 4", not "generation 4.0".
    name = "stale generation given as floats",
    obj = query(4.0, nil, { phase = "Running", observedGeneration = 3.0 }),
    status = "Progressing",
    exact = "Waiting for the operator to observe generation 4",
  },
  {
    name = "spec.suspend set but not yet observed",
    obj = query(2, { sql = "SELECT 1", suspend = true }, {
      phase = "Running",
      observedGeneration = 1,
      conditions = { condition("Ready", "True", "Query is running") },
    }),
    status = "Progressing",
    contains = "observe generation 2",
  },
  {
    name = "spec.suspend true",
    obj = query(2, { sql = "SELECT 1", suspend = true }, {
      phase = "Running",
      observedGeneration = 2,
    }),
    status = "Suspended",
    contains = "suspended",
  },
  {
    name = "phase Suspended",
    obj = query(5, nil, {
      phase = "Suspended",
      observedGeneration = 5,
      conditions = { condition("Ready", "False", "Query is suspended", "Suspended") },
    }),
    status = "Suspended",
    contains = "suspended",
  },
  {
    name = "Degraded condition True while Running",
    obj = query(1, nil, {
      phase = "Running",
      observedGeneration = 1,
      lastError = "connection refused",
      conditions = {
        condition("Ready", "True", "Query is running"),
        condition("Degraded", "True", "Batch 12 failed 3 times: sink unreachable", "RetryingBatch"),
      },
    }),
    status = "Degraded",
    exact = "Batch 12 failed 3 times: sink unreachable",
  },
  {
    name = "Failed with lastError only",
    obj = query(1, nil, {
      phase = "Failed",
      observedGeneration = 1,
      lastError = "source topic orders does not exist",
    }),
    status = "Degraded",
    exact = "source topic orders does not exist",
  },
  {
    name = "Failed with an empty Degraded message falls back to lastError",
    obj = query(1, nil, {
      phase = "Failed",
      observedGeneration = 1,
      lastError = "checkpoint is corrupt",
      conditions = { condition("Degraded", "True", "") },
    }),
    status = "Degraded",
    exact = "checkpoint is corrupt",
  },
  {
    name = "Failed with nothing to say",
    obj = query(1, nil, { phase = "Failed", observedGeneration = 1 }),
    status = "Degraded",
    contains = "failed",
  },
  {
    name = "Completed",
    obj = query(1, nil, {
      phase = "Completed",
      observedGeneration = 1,
      conditions = { condition("Ready", "False", "Query completed", "Completed") },
    }),
    status = "Healthy",
    exact = "The query processed all its input",
  },
  {
    name = "Running and Ready",
    obj = query(7, nil, {
      phase = "Running",
      observedGeneration = 7,
      conditions = {
        condition("Ready", "True", "Query is running, last batch 41"),
        condition("Progressing", "False", "Query is up to date"),
        condition("Degraded", "False", "No errors"),
      },
    }),
    status = "Healthy",
    exact = "Query is running, last batch 41",
  },
  {
    name = "Running and Ready without a message",
    obj = query(1, nil, {
      phase = "Running",
      observedGeneration = 1,
      conditions = { condition("Ready", "True", nil) },
    }),
    status = "Healthy",
    contains = "running",
  },
  {
    name = "Running but not Ready yet: Progressing message",
    obj = query(1, nil, {
      phase = "Running",
      observedGeneration = 1,
      conditions = {
        condition("Ready", "False", "No batch committed yet"),
        condition("Progressing", "True", "Replaying from checkpoint 12"),
      },
    }),
    status = "Progressing",
    exact = "Replaying from checkpoint 12",
  },
  {
    name = "Pending with only a Ready condition: its message",
    obj = query(1, nil, {
      phase = "Pending",
      observedGeneration = 1,
      conditions = { condition("Ready", "False", "Waiting for the Job to start") },
    }),
    status = "Progressing",
    exact = "Waiting for the Job to start",
  },
  {
    -- spec.replicas: 0 (kubectl scale --replicas 0): the operator says Suspended.
    name = "scaled to zero",
    obj = query(2, { sql = "SELECT 1", replicas = 0 }, {
      phase = "Suspended",
      observedGeneration = 2,
      conditions = { condition("Ready", "False", "spec.replicas is 0; its checkpoint is kept.", "ScaledToZero") },
    }),
    status = "Suspended",
    exact = "The query is suspended",
  },
  {
    -- A failed change rolled back: pods run, but not the spec in Git.
    name = "rolled back to the last spec that ran",
    obj = query(5, nil, {
      phase = "Running",
      observedGeneration = 5,
      runningGeneration = 4,
      conditions = {
        condition("Ready", "True", "1/1 engine pods ready.", "RolledBack"),
        condition("Degraded", "True", "Generation 5 failed 3 times in a row (last error: x); rolled back to generation 4, the last spec that ran. Change the spec to try again.", "RolledBack"),
      },
    }),
    status = "Degraded",
    contains = "rolled back to generation 4",
  },
  {
    name = "Pending without conditions",
    obj = query(1, nil, { phase = "Pending", observedGeneration = 1 }),
    status = "Progressing",
    exact = "Waiting for the query to be ready",
  },
}

-- Running the script ------------------------------------------------------------

-- Loads the health script with `obj` as a global, in an environment that only
-- exposes the base library (as Argo CD does) and refuses new globals, so the
-- script must keep its state in locals. Works on Lua 5.1 (setfenv) and 5.2+
-- (loadfile with an environment).
local function run_health(obj)
  local env = {
    obj = obj,
    ipairs = ipairs, pairs = pairs, next = next, select = select,
    type = type, tostring = tostring, tonumber = tonumber,
    string = string, table = table, math = math,
  }
  setmetatable(env, {
    __newindex = function(_, key)
      error("health script set the global '" .. tostring(key) .. "'", 2)
    end,
  })
  local chunk, err
  if setfenv then
    chunk, err = loadfile(script)
    if chunk then setfenv(chunk, env) end
  else
    chunk, err = loadfile(script, "t", env)
  end
  if not chunk then
    return nil, "cannot load " .. script .. ": " .. tostring(err)
  end
  local ok, health = pcall(chunk)
  if not ok then
    return nil, "error: " .. tostring(health)
  end
  if type(health) ~= "table" then
    return nil, "returned " .. type(health) .. " instead of a table"
  end
  return health
end

-- Returns nil if `health` matches the case, or why not.
local function check(case, health)
  local valid = { Healthy = true, Progressing = true, Degraded = true,
                  Suspended = true, Missing = true, Unknown = true }
  if not valid[health.status] then
    return "invalid status " .. tostring(health.status)
  end
  if health.status ~= case.status then
    return string.format("status %s, want %s", health.status, case.status)
  end
  local message = health.message
  if type(message) ~= "string" or message == "" then
    return "empty message"
  end
  if case.exact and message ~= case.exact then
    return string.format("message %q, want %q", message, case.exact)
  end
  if case.contains and not string.find(message, case.contains, 1, true) then
    return string.format("message %q does not contain %q", message, case.contains)
  end
  return nil
end

local passed, failed = 0, 0
for _, case in ipairs(cases) do
  local health, problem = run_health(case.obj)
  if health then
    problem = check(case, health)
  end
  if problem then
    failed = failed + 1
    print("FAIL " .. case.name .. ": " .. problem)
  else
    passed = passed + 1
    print(string.format("ok   %s: %s (%s)", case.name, health.status, health.message))
  end
end

print(string.format("argocd-health: %d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
