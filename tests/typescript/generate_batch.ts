// Compiled by tests/test_generated_clients.py with `tsc --strict --noEmit`, beside api.d.ts that
// openapi-typescript (default settings) generated from the served /openapi.json.
import type { components, paths } from "./api";

type GenerateBatchBody =
  paths["/generate-batch"]["post"]["requestBody"]["content"]["application/json"];
type Job = components["schemas"]["Job"];

// The README's minimal body: a model and its prompts, every other parameter left to its default.
export const minimal: GenerateBatchBody = {
  model_name: "flux-dev",
  prompts: ["A red sports car", "A blue ocean wave"],
};

export const named: GenerateBatchBody = {
  model_name: "flux-dev",
  prompts: ["A red sports car", "A blue ocean wave"],
  custom_filenames: ["car", "wave"],
  aspect_ratio: "16:9",
  async: true,
};

export const tasks: GenerateBatchBody = {
  tasks: [
    { model_name: "flux-dev", prompt: "A lighthouse at dusk" },
    { model_name: "chatterbox", prompt: "Hello there" },
  ],
};

// A job's always-present fields are typed as present: no `?.` needed.
export function progress(job: Job): string {
  const done = job.counts.succeeded + job.counts.failed;
  return `${job.state}: ${done}/${job.total} (${job.items.length} shown)`;
}
