"""Real data for PersonaDual: the paper's training sets and benchmarks as ``Prompt`` records.

Training sets: UltraMedical, FLAN (objective), AlignX (personalized), personas from PersonaHub.
Benchmarks: PubMedQA, TriviaQA, MMLU-Pro, SuperGPQA, MATH-500 (objective), PersonaFeedback,
FSPO roleplay (personalized). Each is read by HF hub id or local file with ``datasets``.
"""

from personadual.benchmarks.personas import (AlignedPersonaConfig, AlignedPersonaError,
                                             AlignedPersonaGenerator, PersonaHubConfig, PersonaPool,
                                             PersonaRequest)
from personadual.benchmarks.registry import (SPECS, BenchmarkConfig, BenchmarkSpec, load_benchmark,
                                             load_benchmarks)
from personadual.benchmarks.sft_selection import TeacherRow, select_sft_trajectories

__all__ = [
    "SPECS", "AlignedPersonaConfig", "AlignedPersonaError", "AlignedPersonaGenerator",
    "BenchmarkConfig", "BenchmarkSpec", "PersonaHubConfig", "PersonaPool", "PersonaRequest",
    "TeacherRow", "load_benchmark", "load_benchmarks", "select_sft_trajectories",
]
