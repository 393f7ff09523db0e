//! Test fixtures: objects shaped exactly as the API server returns them
//! (`kubectl get -o json` of a v1.33 cluster, names changed), deserialised
//! through k8s-openapi so a wrong field name or type fails as it would on
//! the wire. Tests change them with [`set`] and [`remove`].
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// A Deployment's pod on node `node-a`, running, one IPv4 address.
pub fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "creationTimestamp": "2026-11-30T09:12:44Z",
            "generateName": "cart-7d9f8b6c5-",
            "labels": {
                "app": "cart",
                "pod-template-hash": "7d9f8b6c5",
                "version": "v2"
            },
            "managedFields": [
                {
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:generateName": {},
                            "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}, "f:version": {}},
                            "f:ownerReferences": {".": {}, "k:{\"uid\":\"5b0c8e0e-2f7c-4c55-9a4e-6f3f0c1d2e3a\"}": {}}
                        },
                        "f:spec": {
                            "f:containers": {"k:{\"name\":\"cart\"}": {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}}},
                            "f:serviceAccountName": {}
                        }
                    },
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "time": "2026-11-30T09:12:44Z"
                },
                {
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:status": {
                            "f:conditions": {},
                            "f:containerStatuses": {},
                            "f:hostIP": {},
                            "f:phase": {},
                            "f:podIP": {},
                            "f:podIPs": {".": {}, "k:{\"ip\":\"10.244.1.17\"}": {".": {}, "f:ip": {}}},
                            "f:startTime": {}
                        }
                    },
                    "manager": "kubelet",
                    "operation": "Update",
                    "subresource": "status",
                    "time": "2026-11-30T09:12:47Z"
                }
            ],
            "name": "cart-7d9f8b6c5-x2k4q",
            "namespace": "shop",
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "blockOwnerDeletion": true,
                    "controller": true,
                    "kind": "ReplicaSet",
                    "name": "cart-7d9f8b6c5",
                    "uid": "5b0c8e0e-2f7c-4c55-9a4e-6f3f0c1d2e3a"
                }
            ],
            "resourceVersion": "184467",
            "uid": "0f6d1b2a-9c3e-4f5a-8b7c-1d2e3f4a5b6c"
        },
        "spec": {
            "containers": [
                {
                    "env": [{"name": "PORT", "value": "8080"}],
                    "image": "registry.example/shop/cart:2.4.1",
                    "imagePullPolicy": "IfNotPresent",
                    "name": "cart",
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                    "readinessProbe": {
                        "failureThreshold": 3,
                        "httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"},
                        "periodSeconds": 5,
                        "successThreshold": 1,
                        "timeoutSeconds": 1
                    },
                    "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "volumeMounts": [{
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        "name": "kube-api-access-8xk2p",
                        "readOnly": true
                    }]
                }
            ],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": true,
            "nodeName": "node-a",
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "cart",
            "serviceAccountName": "cart",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300}
            ],
            "volumes": [{
                "name": "kube-api-access-8xk2p",
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
                        {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}}
                    ]
                }
            }]
        },
        "status": {
            "conditions": [
                {"lastProbeTime": null, "lastTransitionTime": "2026-11-30T09:12:46Z", "status": "True", "type": "PodReadyToStartContainers"},
                {"lastProbeTime": null, "lastTransitionTime": "2026-11-30T09:12:44Z", "status": "True", "type": "Initialized"},
                {"lastProbeTime": null, "lastTransitionTime": "2026-11-30T09:12:47Z", "status": "True", "type": "Ready"},
                {"lastProbeTime": null, "lastTransitionTime": "2026-11-30T09:12:47Z", "status": "True", "type": "ContainersReady"},
                {"lastProbeTime": null, "lastTransitionTime": "2026-11-30T09:12:44Z", "status": "True", "type": "PodScheduled"}
            ],
            "containerStatuses": [{
                "containerID": "containerd://4f1c0b9e7a6d5c4b3a29180716253443526170819a0b1c2d3e4f5a6b7c8d9e0f",
                "image": "registry.example/shop/cart:2.4.1",
                "imageID": "registry.example/shop/cart@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "lastState": {},
                "name": "cart",
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": "2026-11-30T09:12:46Z"}}
            }],
            "hostIP": "172.18.0.3",
            "hostIPs": [{"ip": "172.18.0.3"}],
            "phase": "Running",
            "podIP": "10.244.1.17",
            "podIPs": [{"ip": "10.244.1.17"}],
            "qosClass": "Burstable",
            "startTime": "2026-11-30T09:12:44Z"
        }
    })
}

/// A ClusterIP Service with a named target port, a numeric one and a UDP
/// port (which the mesh drops).
pub fn service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{\"annotations\":{},\"name\":\"cart\",\"namespace\":\"shop\"},\"spec\":{\"ports\":[{\"name\":\"http\",\"port\":80,\"targetPort\":\"http\"},{\"name\":\"grpc\",\"port\":9090,\"targetPort\":9091},{\"name\":\"stats\",\"port\":8125,\"protocol\":\"UDP\"}],\"selector\":{\"app\":\"cart\"}}}\n"
            },
            "creationTimestamp": "2026-11-29T16:03:10Z",
            "managedFields": [{
                "apiVersion": "v1",
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                    "f:spec": {
                        "f:internalTrafficPolicy": {},
                        "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                        "f:selector": {},
                        "f:sessionAffinity": {},
                        "f:type": {}
                    }
                },
                "manager": "kubectl-client-side-apply",
                "operation": "Update",
                "time": "2026-11-29T16:03:10Z"
            }],
            "name": "cart",
            "namespace": "shop",
            "resourceVersion": "183220",
            "uid": "c3d2e1f0-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
        },
        "spec": {
            "clusterIP": "10.96.14.20",
            "clusterIPs": ["10.96.14.20"],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                {"name": "grpc", "port": 9090, "protocol": "TCP", "targetPort": 9091},
                {"name": "stats", "port": 8125, "protocol": "UDP", "targetPort": 8125}
            ],
            "selector": {"app": "cart"},
            "sessionAffinity": "None",
            "type": "ClusterIP"
        },
        "status": {"loadBalancer": {}}
    })
}

/// The IPv4 EndpointSlice of [`service`]: one ready endpoint, the pod of
/// [`pod`].
pub fn slice() -> Value {
    json!({
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": [{
            "addresses": ["10.244.1.17"],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node-a",
            "targetRef": {
                "kind": "Pod",
                "name": "cart-7d9f8b6c5-x2k4q",
                "namespace": "shop",
                "uid": "0f6d1b2a-9c3e-4f5a-8b7c-1d2e3f4a5b6c"
            },
            "zone": "zone-1"
        }],
        "kind": "EndpointSlice",
        "metadata": {
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-30T09:12:47Z"},
            "creationTimestamp": "2026-11-29T16:03:10Z",
            "generateName": "cart-",
            "generation": 7,
            "labels": {
                "app": "cart",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": "cart"
            },
            "managedFields": [{
                "apiVersion": "discovery.k8s.io/v1",
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:addressType": {},
                    "f:endpoints": {},
                    "f:metadata": {
                        "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                        "f:generateName": {},
                        "f:labels": {".": {}, "f:app": {}, "f:endpointslice.kubernetes.io/managed-by": {}, "f:kubernetes.io/service-name": {}},
                        "f:ownerReferences": {".": {}, "k:{\"uid\":\"c3d2e1f0-1a2b-4c3d-8e9f-0a1b2c3d4e5f\"}": {}}
                    },
                    "f:ports": {}
                },
                "manager": "kube-controller-manager",
                "operation": "Update",
                "time": "2026-11-30T09:12:47Z"
            }],
            "name": "cart-k7j2m",
            "namespace": "shop",
            "ownerReferences": [{
                "apiVersion": "v1",
                "blockOwnerDeletion": true,
                "controller": true,
                "kind": "Service",
                "name": "cart",
                "uid": "c3d2e1f0-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
            }],
            "resourceVersion": "184470",
            "uid": "7a8b9c0d-1e2f-4a3b-9c4d-5e6f7a8b9c0d"
        },
        "ports": [
            {"name": "grpc", "port": 9091, "protocol": "TCP"},
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "stats", "port": 8125, "protocol": "UDP"}
        ]
    })
}

/// Namespace `shop`, enabled for the mesh.
pub fn namespace() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "creationTimestamp": "2026-11-29T15:58:02Z",
            "labels": {
                "istio.io/dataplane-mode": "ambient",
                "kubernetes.io/metadata.name": "shop"
            },
            "managedFields": [{
                "apiVersion": "v1",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:istio.io/dataplane-mode": {}, "f:kubernetes.io/metadata.name": {}}}},
                "manager": "kubectl-label",
                "operation": "Update",
                "time": "2026-11-29T15:58:40Z"
            }],
            "name": "shop",
            "resourceVersion": "182001",
            "uid": "e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b"
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

/// Sets the value at a JSON pointer, creating missing objects on the way
/// (`~1` escapes a `/` in a label key).
pub fn set(v: &mut Value, pointer: &str, new: Value) {
    let mut at = v;
    for token in pointer.trim_start_matches('/').split('/') {
        let token = token.replace("~1", "/").replace("~0", "~");
        at = match at {
            Value::Array(a) => {
                let i = token.parse::<usize>().expect("array index");
                if i == a.len() {
                    a.push(Value::Null);
                }
                &mut a[i]
            }
            other => {
                if !other.is_object() {
                    *other = json!({});
                }
                other
                    .as_object_mut()
                    .expect("object")
                    .entry(token)
                    .or_insert(Value::Null)
            }
        };
    }
    *at = new;
}

/// Removes the value at a JSON pointer.
pub fn remove(v: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let key = key.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent).expect("parent exists") {
        Value::Object(o) => {
            o.remove(&key);
        }
        Value::Array(a) => {
            a.remove(key.parse::<usize>().expect("array index"));
        }
        _ => panic!("{parent} is not a container"),
    }
}

/// A JSON object as k8s-openapi reads it off the wire.
pub fn parse<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("fixture deserialises")
}

/// `base` with the fields at the given pointers set.
pub fn with(mut base: Value, changes: &[(&str, Value)]) -> Value {
    for (pointer, value) in changes {
        set(&mut base, pointer, value.clone());
    }
    base
}
