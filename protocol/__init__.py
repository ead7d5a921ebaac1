"""ddm's wire vocabulary: the gRPC protocol (package ddm.v1) shared by coordinator and client."""
