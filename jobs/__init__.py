"""What users run: batch generation, fine-tuning, schedules, and the `sd3` command line."""

import sd3_core.runtime  # noqa: F401  (thread/MKL settings must precede paddle's import)
