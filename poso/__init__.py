"""The project's custom artifact types under the names Kubeflow Pipelines v2 knows them by.

KFP v2 records a custom TFX artifact type by its TYPE_NAME as the schema title, which must read
`namespace.Name` (one dot), and TFX's container entrypoint (kubeflow_v2_run_executor) imports
the class from that title. So TYPE_NAME "poso.UserState" must import as `poso.UserState`: this
package. The classes live with the component that writes them.
"""

from components.avc_example_gen import QuarantinedRows, UserState

__all__ = ["QuarantinedRows", "UserState"]
