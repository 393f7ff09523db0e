use std::net::IpAddr;

use k8s_openapi::api::{
    core::v1::{Namespace, Pod as KubePod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};

use super::*;
use crate::state::kube::fixtures::{self, parse, remove, set, with};

fn pod_record(v: Value) -> Option<PodRecord> {
    translate_pod(&parse::<KubePod>(v)).expect("translates")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn key(ns: &str, name: &str) -> PodKey {
    PodKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

#[test]
fn running_pod_keeps_only_what_the_agent_needs() {
    let record = pod_record(fixtures::pod()).expect("a pod");
    let pod = &*record.pod;
    assert_eq!(pod.key(), key("shop", "cart-7d9f8b6c5-x2k4q"));
    assert_eq!(
        pod.uid.as_deref(),
        Some("0f6d1b2a-9c3e-4f5a-8b7c-1d2e3f4a5b6c")
    );
    assert_eq!(pod.service_account, "cart");
    assert_eq!(pod.node, "node-a");
    assert_eq!(pod.ips, vec![ip("10.244.1.17")]);
    assert_eq!(pod.labels.get("app").map(String::as_str), Some("cart"));
    assert_eq!(pod.netns, None);
    assert_eq!(record.workload_name, "cart");
    assert!(record.created.is_some());
}

#[test]
fn dual_stack_pod_has_both_addresses_in_order() {
    let record = pod_record(with(
        fixtures::pod(),
        &[(
            "/status/podIPs",
            json!([{"ip": "10.244.1.17"}, {"ip": "fd00:10:244:1::11"}]),
        )],
    ))
    .expect("a pod");
    assert_eq!(
        record.pod.ips,
        vec![ip("10.244.1.17"), ip("fd00:10:244:1::11")]
    );
}

#[test]
fn pod_ip_is_the_fallback_for_pod_ips() {
    let mut v = fixtures::pod();
    remove(&mut v, "/status/podIPs");
    assert_eq!(
        pod_record(v).expect("a pod").pod.ips,
        vec![ip("10.244.1.17")]
    );
}

#[test]
fn pending_pod_without_addresses_is_kept_with_none() {
    let mut v = with(
        fixtures::pod(),
        &[
            ("/status/phase", json!("Pending")),
            (
                "/status/conditions",
                json!([{"lastProbeTime": null, "lastTransitionTime": "2026-11-30T09:12:44Z", "status": "True", "type": "PodScheduled"}]),
            ),
        ],
    );
    for field in ["podIP", "podIPs", "containerStatuses", "startTime"] {
        remove(&mut v, &format!("/status/{field}"));
    }
    let record = pod_record(v).expect("a pod");
    assert!(record.pod.ips.is_empty());
}

#[test]
fn unscheduled_pod_is_left_out() {
    let mut v = with(fixtures::pod(), &[("/status", json!({"phase": "Pending"}))]);
    remove(&mut v, "/spec/nodeName");
    assert_eq!(pod_record(v), None);
}

#[test]
fn terminal_pods_are_left_out() {
    for phase in ["Succeeded", "Failed"] {
        let v = with(fixtures::pod(), &[("/status/phase", json!(phase))]);
        assert_eq!(pod_record(v), None, "{phase}");
    }
}

#[test]
fn terminating_pod_is_kept_while_it_runs() {
    let v = with(
        fixtures::pod(),
        &[
            ("/metadata/deletionTimestamp", json!("2026-11-30T10:00:00Z")),
            ("/metadata/deletionGracePeriodSeconds", json!(30)),
        ],
    );
    assert!(pod_record(v).is_some());
}

#[test]
fn host_network_pod_is_left_out() {
    let v = with(
        fixtures::pod(),
        &[
            ("/spec/hostNetwork", json!(true)),
            ("/status/podIPs", json!([{"ip": "172.18.0.3"}])),
            ("/status/podIP", json!("172.18.0.3")),
        ],
    );
    assert_eq!(pod_record(v), None);
}

#[test]
fn service_account_defaults_to_default() {
    let mut v = fixtures::pod();
    remove(&mut v, "/spec/serviceAccountName");
    remove(&mut v, "/spec/serviceAccount");
    assert_eq!(pod_record(v).expect("a pod").pod.service_account, "default");
}

#[test]
fn a_bad_address_names_the_pod_and_field() {
    let v = with(
        fixtures::pod(),
        &[(
            "/status/podIPs",
            json!([{"ip": "10.244.1.17"}, {"ip": "x"}]),
        )],
    );
    let err = translate_pod(&parse::<KubePod>(v)).expect_err("rejected");
    assert_eq!(
        err.to_string(),
        r#"Pod shop/cart-7d9f8b6c5-x2k4q: status.podIPs[1]: "x" is not an IP"#
    );
}

#[test]
fn recreated_pod_carries_its_new_uid() {
    let old = pod_record(fixtures::pod()).expect("a pod");
    let new = pod_record(with(
        fixtures::pod(),
        &[
            (
                "/metadata/uid",
                json!("9a8b7c6d-5e4f-4321-8fed-cba987654321"),
            ),
            ("/metadata/creationTimestamp", json!("2026-11-30T11:00:02Z")),
            ("/status/podIPs", json!([{"ip": "10.244.1.40"}])),
            ("/status/podIP", json!("10.244.1.40")),
        ],
    ))
    .expect("a pod");
    assert_eq!(old.pod.key(), new.pod.key());
    assert_eq!(
        new.pod.uid.as_deref(),
        Some("9a8b7c6d-5e4f-4321-8fed-cba987654321")
    );
    assert!(new.created > old.created);
}

// ------------------------------------------------------- workload names

fn owned_by(kind: &str, name: &str, extra: &[(&str, Value)]) -> String {
    let mut v = with(
        fixtures::pod(),
        &[(
            "/metadata/ownerReferences",
            json!([{
                "apiVersion": "apps/v1",
                "blockOwnerDeletion": true,
                "controller": true,
                "kind": kind,
                "name": name,
                "uid": "11111111-2222-4333-8444-555555555555"
            }]),
        )],
    );
    for (pointer, value) in extra {
        set(&mut v, pointer, value.clone());
    }
    pod_record(v).expect("a pod").workload_name
}

#[test]
fn workload_name_of_a_deployment_pod_is_the_deployment() {
    assert_eq!(owned_by("ReplicaSet", "cart-7d9f8b6c5", &[]), "cart");
    // A ReplicaSet of no Deployment (no matching hash label) keeps its name.
    assert_eq!(
        owned_by(
            "ReplicaSet",
            "legacy-rs",
            &[("/metadata/labels/pod-template-hash", json!("abc"))]
        ),
        "legacy-rs"
    );
}

#[test]
fn workload_name_of_a_cronjob_pod_is_the_cronjob() {
    assert_eq!(
        owned_by("Job", "nightly-report-29412345", &[]),
        "nightly-report"
    );
    assert_eq!(owned_by("Job", "migrate-db", &[]), "migrate-db");
}

#[test]
fn workload_name_of_statefulset_and_daemonset_pods_is_the_owner() {
    assert_eq!(owned_by("StatefulSet", "orders-db", &[]), "orders-db");
    assert_eq!(owned_by("DaemonSet", "log-shipper", &[]), "log-shipper");
}

#[test]
fn workload_name_label_overrides_owners() {
    assert_eq!(
        owned_by(
            "ReplicaSet",
            "cart-7d9f8b6c5",
            &[(
                "/metadata/labels/service.istio.io~1workload-name",
                json!("cart-canary")
            )]
        ),
        "cart-canary"
    );
}

#[test]
fn workload_name_without_a_controller_is_the_pod() {
    let mut v = fixtures::pod();
    remove(&mut v, "/metadata/ownerReferences");
    assert_eq!(
        pod_record(v).expect("a pod").workload_name,
        "cart-7d9f8b6c5-x2k4q"
    );
    let v = with(
        fixtures::pod(),
        &[("/metadata/ownerReferences/0/controller", json!(false))],
    );
    assert_eq!(
        pod_record(v).expect("a pod").workload_name,
        "cart-7d9f8b6c5-x2k4q"
    );
}

// ------------------------------------------------------------ membership

fn namespace_labels(v: Value) -> Labels {
    translate_namespace(&parse::<Namespace>(v).metadata)
        .expect("translates")
        .1
}

#[test]
fn namespace_enablement_meshes_its_pods() {
    let record = pod_record(fixtures::pod()).expect("a pod");
    let ns = namespace_labels(fixtures::namespace());
    assert_eq!(
        place_pod(Some(&record), Some(&ns), "node-a"),
        PodPlacement::Meshed(record.pod.clone())
    );
    let enabled = labels(&[(MESH_LABEL, "enabled")]);
    assert!(is_meshed(&record.pod.labels, Some(&enabled)));
    // No label on namespace or pod: not meshed.
    let plain = labels(&[("kubernetes.io/metadata.name", "shop")]);
    assert!(!is_meshed(&record.pod.labels, Some(&plain)));
    assert!(!is_meshed(&record.pod.labels, None));
}

#[test]
fn pod_level_enablement_and_opt_out() {
    let ns = namespace_labels(fixtures::namespace());
    let plain = Labels::new();
    assert!(is_meshed(
        &labels(&[(DATAPLANE_MODE_LABEL, "ambient")]),
        Some(&plain)
    ));
    assert!(is_meshed(&labels(&[(MESH_LABEL, "enabled")]), None));
    // Opt-out wins over the namespace and over the other label.
    assert!(!is_meshed(
        &labels(&[(DATAPLANE_MODE_LABEL, "none")]),
        Some(&ns)
    ));
    assert!(!is_meshed(&labels(&[(MESH_LABEL, "disabled")]), Some(&ns)));
    assert!(!is_meshed(
        &labels(&[(MESH_LABEL, "enabled"), (DATAPLANE_MODE_LABEL, "none")]),
        None
    ));
}

#[test]
fn non_meshed_pod_is_out_of_mesh_locally_and_absent_elsewhere() {
    let v = with(
        fixtures::pod(),
        &[("/metadata/labels/istio.io~1dataplane-mode", json!("none"))],
    );
    let record = pod_record(v).expect("a pod");
    let ns = namespace_labels(fixtures::namespace());
    assert_eq!(
        place_pod(Some(&record), Some(&ns), "node-a"),
        PodPlacement::OutOfMesh(record.pod.clone())
    );
    assert_eq!(
        place_pod(Some(&record), Some(&ns), "node-b"),
        PodPlacement::Absent
    );
    assert_eq!(place_pod(None, Some(&ns), "node-a"), PodPlacement::Absent);
}

#[test]
fn local_pod_of_a_namespace_not_seen_yet_is_held_until_it_is() {
    let record = pod_record(fixtures::pod()).expect("a pod");
    // Unknown namespace: neither in nor out (an ADD waits).
    assert_eq!(
        place_pod(Some(&record), None, "node-a"),
        PodPlacement::Absent
    );
    // Known, not meshed: out, answered at once.
    let plain = Labels::new();
    assert_eq!(
        place_pod(Some(&record), Some(&plain), "node-a"),
        PodPlacement::OutOfMesh(record.pod.clone())
    );
    // Opted out by its own label: out, whatever the namespace.
    let v = with(
        fixtures::pod(),
        &[("/metadata/labels/istio.io~1dataplane-mode", json!("none"))],
    );
    let opted_out = pod_record(v).expect("a pod");
    assert_eq!(
        place_pod(Some(&opted_out), None, "node-a"),
        PodPlacement::OutOfMesh(opted_out.pod.clone())
    );
}

// -------------------------------------------------------------- services

fn service_record(v: Value) -> Option<ServiceRecord> {
    translate_service(&parse::<KubeService>(v)).expect("translates")
}

fn slice_record(v: Value) -> SliceRecord {
    translate_slice(&parse::<EndpointSlice>(v))
        .expect("translates")
        .expect("a service's slice")
}

fn port(port: u16, target: Option<u16>) -> ServicePort {
    ServicePort {
        port,
        target_port: target,
    }
}

#[test]
fn named_target_port_is_resolved_from_the_slice_and_udp_dropped() {
    let svc = service_record(fixtures::service()).expect("a service");
    assert_eq!(svc.vips, vec![ip("10.96.14.20")]);
    assert_eq!(
        svc.ports,
        vec![
            ServicePortSpec {
                name: "http".into(),
                port: 80,
                target: TargetPort::Name("http".into())
            },
            ServicePortSpec {
                name: "grpc".into(),
                port: 9090,
                target: TargetPort::Number(9091)
            },
        ]
    );
    let slice = slice_record(fixtures::slice());
    let built = build_service(&svc, [&slice]);
    assert_eq!(built.key(), svc.key);
    assert_eq!(
        built.ports,
        vec![port(80, Some(8080)), port(9090, Some(9091))]
    );
    assert_eq!(built.endpoints, vec![key("shop", "cart-7d9f8b6c5-x2k4q")]);
}

#[test]
fn target_port_without_slices_falls_back_to_the_number_or_the_port() {
    let svc = service_record(with(
        fixtures::service(),
        &[(
            "/spec/ports",
            json!([
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                {"name": "grpc", "port": 9090, "protocol": "TCP", "targetPort": 9091},
                {"name": "admin", "port": 9901, "protocol": "TCP", "targetPort": 9901}
            ]),
        )],
    ))
    .expect("a service");
    let built = build_service(&svc, []);
    assert_eq!(
        built.ports,
        vec![
            port(80, None),
            port(9090, Some(9091)),
            port(9901, Some(9901))
        ]
    );
    assert!(built.endpoints.is_empty());
}

#[test]
fn unnamed_port_matches_the_unnamed_slice_port() {
    let mut svc = fixtures::service();
    set(
        &mut svc,
        "/spec/ports",
        json!([{"port": 80, "protocol": "TCP", "targetPort": "web"}]),
    );
    let mut slice = fixtures::slice();
    set(
        &mut slice,
        "/ports",
        json!([{"name": "", "port": 8081, "protocol": "TCP"}]),
    );
    let built = build_service(
        &service_record(svc).expect("a service"),
        [&slice_record(slice)],
    );
    assert_eq!(built.ports, vec![port(80, Some(8081))]);
}

#[test]
fn dual_stack_service_merges_both_slices() {
    let svc = service_record(with(
        fixtures::service(),
        &[
            (
                "/spec/clusterIPs",
                json!(["10.96.14.20", "fd00:10:96::e14"]),
            ),
            ("/spec/ipFamilies", json!(["IPv4", "IPv6"])),
            ("/spec/ipFamilyPolicy", json!("PreferDualStack")),
        ],
    ))
    .expect("a service");
    assert_eq!(svc.vips, vec![ip("10.96.14.20"), ip("fd00:10:96::e14")]);
    let v4 = with(
        fixtures::slice(),
        &[(
            "/endpoints/1",
            json!({
                "addresses": ["10.244.2.9"],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-b",
                "targetRef": {"kind": "Pod", "name": "cart-7d9f8b6c5-p8r2z", "namespace": "shop", "uid": "22222222-3333-4444-8555-666666666666"}
            }),
        )],
    );
    let v6 = with(
        fixtures::slice(),
        &[
            ("/metadata/name", json!("cart-q4w9n")),
            ("/addressType", json!("IPv6")),
            ("/endpoints/0/addresses", json!(["fd00:10:244:1::11"])),
        ],
    );
    let built = build_service(&svc, [&slice_record(v4), &slice_record(v6)]);
    assert_eq!(
        built.endpoints,
        vec![
            key("shop", "cart-7d9f8b6c5-p8r2z"),
            key("shop", "cart-7d9f8b6c5-x2k4q")
        ]
    );
}

#[test]
fn headless_service_has_no_vip_but_its_endpoints() {
    let svc = service_record(with(
        fixtures::service(),
        &[
            ("/spec/clusterIP", json!("None")),
            ("/spec/clusterIPs", json!(["None"])),
        ],
    ))
    .expect("a service");
    assert!(svc.vips.is_empty());
    let built = build_service(&svc, [&slice_record(fixtures::slice())]);
    assert_eq!(built.endpoints.len(), 1);
}

#[test]
fn external_name_service_is_left_out() {
    let mut v = with(
        fixtures::service(),
        &[
            ("/spec/type", json!("ExternalName")),
            ("/spec/externalName", json!("payments.example.com")),
        ],
    );
    for field in [
        "clusterIP",
        "clusterIPs",
        "selector",
        "ipFamilies",
        "ipFamilyPolicy",
    ] {
        remove(&mut v, &format!("/spec/{field}"));
    }
    assert_eq!(service_record(v), None);
}

#[test]
fn cluster_ip_is_the_fallback_for_cluster_ips() {
    let mut v = fixtures::service();
    remove(&mut v, "/spec/clusterIPs");
    assert_eq!(
        service_record(v).expect("a service").vips,
        vec![ip("10.96.14.20")]
    );
}

#[test]
fn a_bad_vip_names_the_service_and_field() {
    let v = with(
        fixtures::service(),
        &[("/spec/clusterIPs", json!(["10.96.14.20", "10.96.14"]))],
    );
    let err = translate_service(&parse::<KubeService>(v)).expect_err("rejected");
    assert_eq!(
        err.to_string(),
        r#"Service shop/cart: spec.clusterIPs[1]: "10.96.14" is not an IP"#
    );
}

fn endpoint(name: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": ["10.244.1.50"],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": "node-a",
        "targetRef": {"kind": "Pod", "name": name, "namespace": "shop", "uid": "33333333-4444-4555-8666-777777777777"}
    })
}

#[test]
fn terminating_and_unready_endpoints_are_left_out() {
    let slice = with(
        fixtures::slice(),
        &[(
            "/endpoints",
            json!([
                endpoint("ready", true, true, false),
                endpoint("starting", false, false, false),
                endpoint("draining", false, true, true),
                endpoint("gone", false, false, true),
                // Manual addresses have no pod, hence no identity.
                {"addresses": ["192.0.2.10"], "conditions": {"ready": true}},
                // No conditions: ready, per the API.
                {"addresses": ["10.244.1.51"], "targetRef": {"kind": "Pod", "name": "legacy", "namespace": "shop"}}
            ]),
        )],
    );
    let slice = slice_record(slice);
    let svc = service_record(fixtures::service()).expect("a service");
    assert_eq!(
        build_service(&svc, [&slice]).endpoints,
        vec![key("shop", "legacy"), key("shop", "ready")]
    );
    // Publishing not-ready addresses admits the serving ones.
    let svc = service_record(with(
        fixtures::service(),
        &[("/spec/publishNotReadyAddresses", json!(true))],
    ))
    .expect("a service");
    assert_eq!(
        build_service(&svc, [&slice]).endpoints,
        vec![
            key("shop", "draining"),
            key("shop", "legacy"),
            key("shop", "ready")
        ]
    );
}

#[test]
fn slice_without_a_service_label_is_left_out() {
    let mut v = fixtures::slice();
    remove(&mut v, "/metadata/labels/kubernetes.io~1service-name");
    assert_eq!(
        translate_slice(&parse::<EndpointSlice>(v)).expect("translates"),
        None
    );
}
