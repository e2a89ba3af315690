"""The OCI registry process: distribution-spec v1.1 write routes over Layerlog's commands, served
together with the read routes from one index that this process projects from the events."""
