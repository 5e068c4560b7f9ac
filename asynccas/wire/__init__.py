"""Protobuf wire bytes read and written by hand, for the few paths where building messages costs
more than the work itself: varints, digests in their length-delimited form, FindMissingBlobs
requests and the batch responses. Each has a property test against protobuf's own encoder."""
