"""poso-ranking: a TFX daily-retraining ranking pipeline personalized with POSO.

Beam workers on remote runners (Dataflow, Flink, Spark) get the project's code through this file
(`--setup_file`), as TFX expects. Versions are pinned in requirements.lock; install_requires
names only the direct dependencies.
"""

import setuptools

setuptools.setup(
    name="poso-ranking",
    version="0.1.0",
    description="Daily TFX retraining of a multi-task ranking model personalized with POSO for user cold start",
    python_requires=">=3.10,<3.14",
    packages=setuptools.find_packages(include=["pipeline*", "components*", "poso*", "models*", "feature_specs*", "serving*"]),
    install_requires=[
        "tfx==1.21.0",
        "tensorflow-recommenders==0.7.7",
        "tf-keras",
        "tensorflow-serving-api",
        "grpcio",
        "aiohttp",
        "pyarrow",
        "pandas",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "scikit-learn"]},
    entry_points={"console_scripts": ["poso=pipeline.cli:main"]},
)
